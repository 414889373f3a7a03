"""Plain-PyTorch FlashMHF: the ground truth the kernels are checked against.

Everything here is written for clarity, not speed; run it in float64 for an exact reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_mhf(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The FlashMHF core: ``s[t,h] = sum_e r[t,h,e] * (silu(q K_e^T) * (q U_e^T)) V_e``.

    q: (..., H, d_h); k, u, v: (H_kv, E, d_e, d_h); r: (..., H, E). Returns s shaped like q,
    computed in the dtype of q (pass float64 tensors for the exact reference).
    """
    h, h_kv = q.shape[-2], k.shape[0]
    group = h // h_kv
    # Expand shared kv heads to one per query head: (H, E, d_e, d_h).
    k, u, v = (w.repeat_interleave(group, dim=0) for w in (k, u, v))
    m = torch.einsum("...hd,hefd->...hef", q, k)
    n = torch.einsum("...hd,hefd->...hef", q, u)
    a = F.silu(m) * n * r.to(q.dtype).unsqueeze(-1)
    return torch.einsum("...hef,hefd->...hd", a, v)


def router(q: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """Sigmoid gate normalised to sum 1 over the sub-networks, in fp32. q: (..., H, d_h)."""
    logits = torch.einsum("...hd,hde->...he", q.float(), w_router.float())
    g = torch.sigmoid(logits)
    return g / g.sum(-1, keepdim=True)


def head_rms_norm(q: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-head RMSNorm over d_h, computed in fp32 and returned in q's dtype."""
    qf = q.float()
    qf = qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + eps)
    return (qf * weight.float()).to(q.dtype)


def layer(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    k: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    w_router: torch.Tensor,
    head_norm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full FlashMHF layer of DESIGN.md §1 for x of shape (..., d_model)."""
    n_heads, head_dim = w_router.shape[0], w_router.shape[1]
    q = F.linear(x, w_in).unflatten(-1, (n_heads, head_dim))
    if head_norm_weight is not None:
        q = head_rms_norm(q, head_norm_weight)
    r = router(q, w_router)
    s = flash_mhf(q, k, u, v, r)
    return F.linear(s.flatten(-2), w_out)
