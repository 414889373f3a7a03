"""Correctness checks shared by the tuner and the benchmarks: random inputs and the float64 reference."""

from __future__ import annotations

import torch

from flashmhf.codegen.dtypes import torch_dtypes
from flashmhf_runtime import reference

# Spec dtype names -> torch dtypes (inputs are built in the spec's dtype).
TORCH_DTYPES = torch_dtypes()


def reference_f64(q, k, u, v, r, chunk: int = 2048) -> torch.Tensor:
    """float64 reference of the core, chunked over tokens so large T fits in memory."""
    k64, u64, v64 = (w.double() for w in (k, u, v))
    q2, r2 = q.reshape(-1, *q.shape[-2:]), r.reshape(-1, *r.shape[-2:])
    parts = [
        reference.flash_mhf(q2[i : i + chunk].double(), k64, u64, v64, r2[i : i + chunk].double())
        for i in range(0, q2.shape[0], chunk)
    ]
    return torch.cat(parts).view(q.shape)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; any non-finite value (e.g. unwritten poison) counts as inf."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def core_inputs(spec_or_shape, tokens: int, dtype: torch.dtype, device, seed: int):
    """Fresh random inputs scaled like a trained layer (q ~ N(0,1), weights ~ N(0, 1/d_h), r on the
    simplex). ``spec_or_shape`` is a Spec or (H, H_kv, d_h, E, d_e)."""
    s = spec_or_shape
    h, h_kv, d_h, e, d_e = (
        (s.n_heads, s.n_kv_heads, s.head_dim, s.n_experts, s.expert_dim) if hasattr(s, "n_heads") else s
    )
    kw = dict(device=device, generator=torch.Generator(device=device).manual_seed(seed))
    q = torch.randn(tokens, h, d_h, **kw).to(dtype)
    k, u, v = ((torch.randn(h_kv, e, d_e, d_h, **kw) * d_h**-0.5).to(dtype) for _ in range(3))
    r = torch.softmax(torch.randn(tokens, h, e, **kw), -1)
    return q, k, u, v, r


def reference_grads_f64(q, k, u, v, r, ds, chunk: int = 2048) -> tuple[torch.Tensor, ...]:
    """float64 (dq, dk, du, dv, dr) of the core for output gradient ``ds``, chunked over tokens
    (dq, dr are per token; dk, du, dv are summed over the chunks)."""
    q2, r2, ds2 = (t.reshape(-1, *t.shape[-2:]) for t in (q, r, ds))
    ws = [w.detach().double().requires_grad_() for w in (k, u, v)]
    dws = [torch.zeros_like(w) for w in ws]
    dqs, drs = [], []
    for i in range(0, q2.shape[0], chunk):
        qc = q2[i : i + chunk].detach().double().requires_grad_()
        rc = r2[i : i + chunk].detach().double().requires_grad_()
        s = reference.flash_mhf(qc, *ws, rc)
        grads = torch.autograd.grad(s, (qc, *ws, rc), ds2[i : i + chunk].double())
        dqs.append(grads[0])
        drs.append(grads[4])
        for acc, g in zip(dws, grads[1:4]):
            acc += g
    return (torch.cat(dqs).view(q.shape), *dws, torch.cat(drs).view(r.shape))


def reference_norm_router_f64(q, norm_w, w_r) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (qn, r) of the layer's head RMSNorm (skipped when ``norm_w`` is None) and router."""
    qn = q.double() if norm_w is None else reference.head_rms_norm(q.double(), norm_w.double())
    return qn, reference.router(qn, w_r.double())


def reference_norm_router_grads_f64(q, norm_w, w_r, dqn, dr) -> tuple[torch.Tensor, ...]:
    """float64 (dq, dW_r, dw_norm) of q -> (qn, r) for the gradients dqn (of qn, as the core would give
    it) and dr; dw_norm is None without a norm."""
    leaves = [t.detach().double().requires_grad_() for t in (q, w_r)]
    nw = None if norm_w is None else norm_w.detach().double().requires_grad_()
    qn, r = reference_norm_router_f64(leaves[0], nw, leaves[1])
    inputs = (*leaves, nw) if nw is not None else tuple(leaves)
    grads = torch.autograd.grad((qn, r), inputs, (dqn.double(), dr.double()))
    return grads[0], grads[1], grads[2] if nw is not None else None
