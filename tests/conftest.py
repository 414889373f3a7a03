"""Test setup: kernels run under Triton's CPU interpreter (set before anything imports triton)."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLASHMHF_KERNEL_DIR", tempfile.mkdtemp(prefix="flashmhf-test-kernels-"))
os.environ.setdefault("FLASHMHF_CACHE_DIR", tempfile.mkdtemp(prefix="flashmhf-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import interpreter_bf16_shim  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1":
    # With the interpreter's bf16 made exact, the op runs the bf16 kernels themselves (users' runs
    # without the shim compute bf16 through the fp32 kernels: flashmhf_runtime.op.INTERPRETER_RUNS_BF16).
    from flashmhf_runtime import op

    interpreter_bf16_shim.install()
    op.INTERPRETER_RUNS_BF16 = True

HAS_GPU = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine without TRITON_INTERPRET)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)
