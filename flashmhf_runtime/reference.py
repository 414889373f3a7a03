"""Plain-PyTorch FlashMHF: the ground truth the kernels are checked against.

Everything here is written for clarity, not speed; run it in float64 for an exact reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The head RMSNorm's epsilon (the authors' configs).
HEAD_NORM_EPS = 1e-5


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


def flash_mhf_backward(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, ds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, du, dv, dr) of :func:`flash_mhf` for the output gradient ``ds``, written out
    (docs/design.md §1) rather than by autograd, so it also runs where autograd is off (inside a custom op).
    Computed in the dtype of q; ``dr`` in that dtype too."""
    h, h_kv = q.shape[-2], k.shape[0]
    group = h // h_kv
    ke, ue, ve = (w.repeat_interleave(group, dim=0) for w in (k, u, v))
    m = torch.einsum("...hd,hefd->...hef", q, ke)
    n = torch.einsum("...hd,hefd->...hef", q, ue)
    da = torch.einsum("...hd,hefd->...hef", ds, ve)
    sig = torch.sigmoid(m)
    silu = m * sig
    r_ = r.to(q.dtype).unsqueeze(-1)
    dr = (da * silu * n).sum(-1)
    dn = r_ * da * silu
    dm = r_ * da * n * (sig + silu * (1 - sig))
    dq = torch.einsum("...hef,hefd->...hd", dm, ke) + torch.einsum("...hef,hefd->...hd", dn, ue)

    def per_kv_head(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Sum over tokens, then over the heads sharing each kv head: (H_kv, E, d_e, d_h).
        w = torch.einsum("...hef,...hd->hefd", x, y)
        return w.unflatten(0, (h_kv, group)).sum(1)

    return dq, per_kv_head(dm, q), per_kv_head(dn, q), per_kv_head(silu * n * r_, ds), dr


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 (the layer's norm and router compute in fp32), or as is if it is float64."""
    return t if t.dtype == torch.float64 else t.float()


def router(q: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """Sigmoid gate normalised to sum 1 over the sub-networks, in fp32. q: (..., H, d_h)."""
    logits = torch.einsum("...hd,hde->...he", at_least_fp32(q), at_least_fp32(w_router))
    g = torch.sigmoid(logits)
    return g / g.sum(-1, keepdim=True)


def head_rms_norm(q: torch.Tensor, weight: torch.Tensor, eps: float = HEAD_NORM_EPS) -> torch.Tensor:
    """Per-head RMSNorm over d_h, computed in fp32 and returned in q's dtype."""
    qf = at_least_fp32(q)
    qf = qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + eps)
    return (qf * at_least_fp32(weight)).to(q.dtype)


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
    """The full FlashMHF layer of docs/design.md §1 for x of shape (..., d_model)."""
    n_heads, head_dim = w_router.shape[0], w_router.shape[1]
    q = F.linear(x, w_in).unflatten(-1, (n_heads, head_dim))
    if head_norm_weight is not None:
        q = head_rms_norm(q, head_norm_weight)
    r = router(q, w_router)
    s = flash_mhf(q, k, u, v, r)
    return F.linear(s.flatten(-2), w_out)
