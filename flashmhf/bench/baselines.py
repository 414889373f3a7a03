"""The baselines users compare against: a cuBLAS SwiGLU FFN of the same d_ff."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``W_down(silu(W_gate x) * W_up x)`` with w_gate, w_up: (d_ff, d_model), w_down: (d_model, d_ff)."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def swiglu_weights(d_model: int, d_ff: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    std = d_model**-0.5
    return (
        torch.randn(d_ff, d_model, device=device, dtype=dtype) * std,
        torch.randn(d_ff, d_model, device=device, dtype=dtype) * std,
        torch.randn(d_model, d_ff, device=device, dtype=dtype) * d_ff**-0.5,
    )
