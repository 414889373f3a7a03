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
    interpreter_bf16_shim.install()

HAS_GPU = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine without TRITON_INTERPRET)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)
