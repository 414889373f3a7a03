"""Checks of the core op's inputs: every mismatch raises ValueError naming argument, expected, got."""

from __future__ import annotations

import torch

from flashmhf.codegen.dtypes import torch_dtypes

DTYPE_NAMES = {dtype: name for name, dtype in torch_dtypes().items()}  # torch dtype -> spec dtype name
SUPPORTED_DTYPES = tuple(DTYPE_NAMES)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_core_inputs(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor
) -> tuple[int, int, int, int, int]:
    """Validate the core op's arguments; return (H, H_kv, d_h, E, d_e)."""
    for name, t in (("q", q), ("k", k), ("u", u), ("v", v), ("r", r)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dim() < 2:
        raise ValueError(f"q: expected shape (..., H, d_h) with at least 2 dims, got {_shape(q)}")
    if k.dim() != 4:
        raise ValueError(f"k: expected shape (H_kv, E, d_e, d_h), got {_shape(k)}")
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    if n_heads == 0 or head_dim == 0:
        raise ValueError(f"q: expected H >= 1 heads of d_h >= 1, got {_shape(q)}")
    n_kv, n_exp, d_e, d_h_k = k.shape
    if n_exp == 0 or d_e == 0:
        raise ValueError(f"k: expected E >= 1 sub-networks of d_e >= 1, got {_shape(k)}")
    if d_h_k != head_dim:
        raise ValueError(f"k: expected last dim d_h={head_dim} (from q), got {_shape(k)}")
    for name, t in (("u", u), ("v", v)):
        if t.shape != k.shape:
            raise ValueError(f"{name}: expected shape {_shape(k)} (same as k), got {_shape(t)}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"k: expected H_kv dividing H={n_heads} heads of q, got H_kv={n_kv}")
    expected_r = (*q.shape[:-1], n_exp)
    if tuple(r.shape) != expected_r:
        want = ", ".join(map(str, expected_r))
        raise ValueError(f"r: expected shape ({want}) (q's leading dims, E), got {_shape(r)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: expected dtype bfloat16, float16 or float32, got {q.dtype}")
    for name, t in (("k", k), ("u", u), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    if r.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"r: expected dtype float32 or {q.dtype} (q's), got {r.dtype}")
    for name, t in (("k", k), ("u", u), ("v", v), ("r", r)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
    return n_heads, n_kv, head_dim, n_exp, d_e


def check_grad_output(q: torch.Tensor, ds: torch.Tensor) -> None:
    """The gradient of s must match s = the core's output: q's shape, dtype and device."""
    if not isinstance(ds, torch.Tensor):
        raise ValueError(f"ds: expected a torch.Tensor, got {type(ds).__name__}")
    if ds.shape != q.shape:
        raise ValueError(f"ds: expected shape {_shape(q)} (same as q), got {_shape(ds)}")
    if ds.dtype != q.dtype:
        raise ValueError(f"ds: expected dtype {q.dtype} (same as q), got {ds.dtype}")
    if ds.device != q.device:
        raise ValueError(f"ds: expected device {q.device} (same as q), got {ds.device}")
