"""Build inputs for a kernel kind and launch it with a config: the unit the tuner times and checks."""

from __future__ import annotations

import torch

from flashmhf.checks import core_inputs
from flashmhf.codegen import Config, Spec, load

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_args(spec: Spec, tokens: int, device: str, seed: int) -> tuple:
    """Fresh random inputs (never zeros) plus the output buffer(s) for ``spec.kind``, poisoned with NaN."""
    dtype = TORCH_DTYPES[spec.dtype]
    q, k, u, v, r = core_inputs(spec, tokens, dtype, device, seed)
    if spec.kind == "fwd":
        out = torch.full_like(q, float("nan"))
        return (q, k, u, v, r, out)
    raise ValueError(f"kind: no input builder for {spec.kind!r} yet")


def run_kind(spec: Spec, config: Config, args: tuple) -> object:
    return load(spec).launch(*args, **config)
