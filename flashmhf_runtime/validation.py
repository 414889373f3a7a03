"""Checks of the core op's and the layer op's inputs: every mismatch raises ValueError naming argument,
expected, got."""

from __future__ import annotations

import torch

from flashmhf.codegen.dtypes import torch_dtypes

DTYPE_NAMES = {dtype: name for name, dtype in torch_dtypes().items()}  # torch dtype -> spec dtype name
SUPPORTED_DTYPES = tuple(DTYPE_NAMES)


def shape_text(t: torch.Tensor) -> str:
    """A tensor's shape as error messages print it: (2, 3)."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensors(named: tuple, optional: tuple[str, ...] = ()) -> None:
    for name, t in named:
        if not isinstance(t, torch.Tensor) and not (name in optional and t is None):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_uv_and_kv_heads(k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_heads: int) -> None:
    """u and v shaped like k; k's H_kv divides the H heads."""
    for name, t in (("u", u), ("v", v)):
        if t.shape != k.shape:
            raise ValueError(f"{name}: expected shape {shape_text(k)} (same as k), got {shape_text(t)}")
    n_kv = k.shape[0]
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"k: expected H_kv dividing H={n_heads} heads, got H_kv={n_kv}")


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: expected dtype bfloat16, float16 or float32, got {q.dtype}")


def _check_like_q(q: torch.Tensor, named: tuple, dtype: bool = True) -> None:
    """Each tensor of ``named`` (None skipped) on q's device and, with ``dtype``, of q's dtype."""
    for name, t in named:
        if t is None:
            continue
        if dtype and t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")


def check_core_inputs(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor
) -> tuple[int, int, int, int, int]:
    """Validate the core op's arguments; return (H, H_kv, d_h, E, d_e)."""
    _check_tensors((("q", q), ("k", k), ("u", u), ("v", v), ("r", r)))
    if q.dim() < 2:
        raise ValueError(f"q: expected shape (..., H, d_h) with at least 2 dims, got {shape_text(q)}")
    if k.dim() != 4:
        raise ValueError(f"k: expected shape (H_kv, E, d_e, d_h), got {shape_text(k)}")
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    if n_heads == 0 or head_dim == 0:
        raise ValueError(f"q: expected H >= 1 heads of d_h >= 1, got {shape_text(q)}")
    n_kv, n_exp, d_e, d_h_k = k.shape
    if n_exp == 0 or d_e == 0:
        raise ValueError(f"k: expected E >= 1 sub-networks of d_e >= 1, got {shape_text(k)}")
    if d_h_k != head_dim:
        raise ValueError(f"k: expected last dim d_h={head_dim} (from q), got {shape_text(k)}")
    _check_uv_and_kv_heads(k, u, v, n_heads)
    expected_r = (*q.shape[:-1], n_exp)
    if tuple(r.shape) != expected_r:
        want = ", ".join(map(str, expected_r))
        raise ValueError(f"r: expected shape ({want}) (q's leading dims, E), got {shape_text(r)}")
    _check_dtype(q)
    _check_like_q(q, (("k", k), ("u", u), ("v", v)))
    if r.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"r: expected dtype float32 or {q.dtype} (q's), got {r.dtype}")
    _check_like_q(q, (("r", r),), dtype=False)
    return n_heads, n_kv, head_dim, n_exp, d_e


def check_layer_inputs(q, norm_w, w_r, k, u, v) -> tuple[int, int, int, int, int]:
    """Validate the layer op's arguments (q the W_in output, (..., H * d_h)); return (H, H_kv, d_h, E, d_e)."""
    named = (("q", q), ("norm_w", norm_w), ("w_r", w_r), ("k", k), ("u", u), ("v", v))
    _check_tensors(named, optional=("norm_w",))
    if w_r.dim() != 3:
        raise ValueError(f"w_r: expected shape (H, d_h, E), got {shape_text(w_r)}")
    n_heads, head_dim, n_exp = w_r.shape
    if q.dim() < 1 or q.shape[-1] != n_heads * head_dim:
        raise ValueError(f"q: expected shape (..., {n_heads * head_dim}) (H * d_h from w_r), got {shape_text(q)}")
    if norm_w is not None and tuple(norm_w.shape) != (n_heads, head_dim):
        raise ValueError(f"norm_w: expected shape ({n_heads}, {head_dim}) (H, d_h from w_r), got {shape_text(norm_w)}")
    if k.dim() != 4 or k.shape[1] != n_exp or k.shape[3] != head_dim:
        raise ValueError(f"k: expected shape (H_kv, {n_exp}, d_e, {head_dim}) (E, d_h from w_r), got {shape_text(k)}")
    _check_uv_and_kv_heads(k, u, v, n_heads)
    _check_dtype(q)
    _check_like_q(q, named[1:])
    return n_heads, k.shape[0], head_dim, n_exp, k.shape[2]


def check_grad_output(q: torch.Tensor, ds: torch.Tensor) -> None:
    """The gradient of s must match s = the core's output: q's shape, dtype and device."""
    if not isinstance(ds, torch.Tensor):
        raise ValueError(f"ds: expected a torch.Tensor, got {type(ds).__name__}")
    if ds.shape != q.shape:
        raise ValueError(f"ds: expected shape {shape_text(q)} (same as q), got {shape_text(ds)}")
    if ds.dtype != q.dtype:
        raise ValueError(f"ds: expected dtype {q.dtype} (same as q), got {ds.dtype}")
    if ds.device != q.device:
        raise ValueError(f"ds: expected device {q.device} (same as q), got {ds.device}")
