"""Activation memory one layer keeps for its backward at T = 16384 (CPU, no GPU needed).

Counts the bytes of every tensor autograd saves (each storage once) at two token counts; the
difference is per token, so the weights cancel. The core is stood in for by a function that saves
what the op saves (q and r), since the interpreter would take minutes at these sizes.

    python -m benchmarks.saved_activations
"""

from __future__ import annotations

import torch

import flashmhf_runtime as fm
from benchmarks.common import argument_parser
from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.layer import saved_bytes_by_dtype
from flashmhf_runtime import lean_autograd, reference

TOKENS = 16384


def _per_token(step) -> float:
    return (sum(saved_bytes_by_dtype(lambda: step(256)).values())
            - sum(saved_bytes_by_dtype(lambda: step(128)).values())) / 128


def _layer_step(layer: fm.FlashMHF, plain: bool):
    def step(tokens: int):
        x = torch.randn(tokens, layer.d_model, dtype=torch.bfloat16, requires_grad=True)
        lean = (lean_autograd.head_rms_norm, lean_autograd.router)
        if plain:  # the norm and router as plain torch ops (the reference), as before
            lean_autograd.head_rms_norm, lean_autograd.router = reference.head_rms_norm, reference.router
        try:
            return layer(x)
        finally:
            lean_autograd.head_rms_norm, lean_autograd.router = lean
    return step


def main(argv: list[str] | None = None) -> None:
    argument_parser(__spec__.name, __doc__).parse_args(argv)
    for name in ("repo-1.3b", "paper-1.3b"):
        torch.manual_seed(0)
        layer = fm.FlashMHF.from_preset(name, dtype=torch.bfloat16)
        layer.core_fn = lambda q, k, u, v, r: q * r.sum(-1, keepdim=True).to(q.dtype)  # saves q and r
        for plain in (True, False):
            mib = _per_token(_layer_step(layer, plain)) * TOKENS / 2**20
            print(f"{name:10s} FlashMHF layer, norm/router {'plain torch' if plain else 'lean      '}: {mib:5.0f} MiB")
        p = fm.get_preset(name)
        w = [t.requires_grad_() for t in swiglu_weights(p.d_model, p.d_ff, "cpu", torch.bfloat16)]
        mib = _per_token(lambda t, d=p.d_model, w=w: swiglu(
            torch.randn(t, d, dtype=torch.bfloat16, requires_grad=True), *w))
        print(f"{name:10s} SwiGLU FFN (d_ff {p.d_ff}), eager:        {mib * TOKENS / 2**20:5.0f} MiB")


if __name__ == "__main__":
    main()
