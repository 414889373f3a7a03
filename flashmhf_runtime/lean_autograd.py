"""The layer's head RMSNorm and router with hand-written backwards that save only 16-bit q.

Both compute in fp32 (docs/design.md §1). Written as plain torch ops, autograd keeps their fp32
intermediates for backward: for a (T, d_model) q that is four fp32 copies of q for the norm (q, its
square, the normalised q, the weighted one) and one for the router's einsum. At T = 16384 and
d_model 2048 each copy is 128 MiB, so a training step of the repo-1.3b layer peaked at 911 MiB
against 509 for paper-1.3b, which has no norm (docs/benchmarks/2026-11-29-layer-training-step.md).
These functions save q as given (16-bit, and the same tensor the core saves), the weights, and
per-row statistics; backward recomputes the fp32 values it needs. Same maths as
``reference.head_rms_norm`` and ``reference.router``; the tests check values and gradients against
them and count the bytes saved for backward.
"""

from __future__ import annotations

import torch

from flashmhf_runtime.reference import at_least_fp32 as _wide


class _HeadRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = head_rms_norm_rstd(q, eps)
        ctx.save_for_backward(q, weight, rstd)
        return (_wide(q) * rstd * _wide(weight)).to(q.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, weight, rstd = ctx.saved_tensors
        dq, dweight = head_rms_norm_backward(q, weight, rstd, dy)
        return dq, dweight, None


class _Router(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
        g, total = router_gate(q, w_router)
        ctx.save_for_backward(q, w_router, g, total)
        return g / total

    @staticmethod
    def backward(ctx, dr: torch.Tensor):
        q, w_router, g, total = ctx.saved_tensors
        return router_backward(q, w_router, g, total, dr)


def head_rms_norm_backward(q: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor):
    """(dq, dweight) of the head RMSNorm for the output gradient ``dy``, in q's and weight's dtypes;
    ``rstd`` (..., H, 1) is the fp32 reciprocal RMS of q's rows."""
    q_hat = _wide(q) * rstd  # new tensors: the in-place steps below never touch q or dy
    g = _wide(dy) * _wide(weight)
    dweight = (_wide(dy) * q_hat).reshape(-1, *weight.shape).sum(0)
    # d/dq of q * rstd(q): rstd * (g - q_hat * mean(g * q_hat)) over the head dimension, in
    # place so that at most three fp32 tensors of q's size are alive at once.
    dot = (g * q_hat).mean(-1, keepdim=True)
    dq = g.sub_(q_hat.mul_(dot)).mul_(rstd)
    return dq.to(q.dtype), dweight.to(weight.dtype)


def head_rms_norm_rstd(q: torch.Tensor, eps: float) -> torch.Tensor:
    """The fp32 reciprocal RMS of q's rows over d_h, (..., H, 1)."""
    return torch.rsqrt(_wide(q).pow(2).mean(-1, keepdim=True) + eps)


def router_gate(q: torch.Tensor, w_router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 sigmoid gate g = sigmoid(q W_r) (..., H, E) and its sum over E (..., H, 1)."""
    g = torch.sigmoid(torch.einsum("...hd,hde->...he", _wide(q), _wide(w_router)))
    return g, g.sum(-1, keepdim=True)


def router_backward(q: torch.Tensor, w_router: torch.Tensor, g: torch.Tensor, total: torch.Tensor,
                    dr: torch.Tensor):
    """(dq, dw_router) of r = g / sum(g) for the gradient ``dr``, in q's and w_router's dtypes."""
    r = g / total
    dg = (dr - (dr * r).sum(-1, keepdim=True)) / total  # through r = g / sum(g)
    dlogits = dg * g * (1.0 - g)
    dq = torch.einsum("...he,hde->...hd", dlogits, _wide(w_router))
    dw = torch.einsum("...hd,...he->hde", _wide(q), dlogits)
    return dq.to(q.dtype), dw.to(w_router.dtype)


def head_rms_norm(q: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-head RMSNorm of q (..., H, d_h) over d_h with weight (H, d_h), in fp32, returned in q's dtype."""
    return _HeadRMSNorm.apply(q, weight, eps)


def router(q: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """Router weights (..., H, E) in fp32: sigmoid(q W_r) normalised to sum 1 over E."""
    return _Router.apply(q, w_router)
