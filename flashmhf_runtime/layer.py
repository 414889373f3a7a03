"""The FlashMHF layer (docs/design.md §1): a drop-in replacement for a Transformer's SwiGLU FFN.

``y = W_out · core(q, K, U, V, router(q))`` with ``q = norm(W_in x)`` viewed per head; the core is
``fm.flash_mhf`` (generated kernels on CUDA). Parameter layout and initialisation follow the
authors' public code, so their checkpoints load through ``flashmhf_runtime.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flashmhf_runtime import layer_eager, lean_autograd
from flashmhf_runtime.layer_op import layer_core
from flashmhf_runtime.presets import get_preset
from flashmhf_runtime.reference import HEAD_NORM_EPS

# Initialisation of the authors' public configs (initializer_range 0.02, w_self gains 0.707).
INIT_STD = 0.02
PROJ_GAIN = 0.707

Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_divides(name: str, value: int, of_name: str, of: int) -> None:
    if of % value:
        raise ValueError(f"{name}: expected a divisor of {of_name}={of}, got {value}")


class HeadRMSNorm(nn.Module):
    """Per-head RMSNorm over d_h with a weight per head, (H, d_h); computed in fp32."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = HEAD_NORM_EPS, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim, device=device, dtype=dtype))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return lean_autograd.head_rms_norm(q, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class FlashMHF(nn.Module):
    """Flash Multi-Head FFN mapping (..., d_model) to (..., d_model).

    d_model = n_heads · d_h and d_ff = n_experts · d_e. ``n_kv_heads`` < ``n_heads`` shares K/U/V
    across groups of heads (head h uses kv head ``h // (n_heads // n_kv_heads)``). ``head_norm``
    adds the per-head RMSNorm of q used by the authors' 370M/1.3B configs.

    Between its two projections the layer is one op (``flashmhf_runtime.layer_op.layer_core``):
    generated kernels for the head norm and router around the core's kernels, forward and backward.
    ``core_fn`` (an attribute, default ``None``) swaps the core for another function of
    (q, k, u, v, r), e.g. the reference for a side-by-side run; the norm and router then run as
    PyTorch ops (``route``, ``head_norm``). In eager mode, with plain bias-free projections (see
    ``flashmhf_runtime.layer_eager.usable``), the projections and that op run as one autograd node.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        n_experts: int,
        *,
        n_kv_heads: int | None = None,
        head_norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_model = _check_positive_int("d_model", d_model)
        n_heads = _check_positive_int("n_heads", n_heads)
        d_ff = _check_positive_int("d_ff", d_ff)
        n_experts = _check_positive_int("n_experts", n_experts)
        n_kv_heads = n_heads if n_kv_heads is None else _check_positive_int("n_kv_heads", n_kv_heads)
        _check_divides("n_heads", n_heads, "d_model", d_model)
        _check_divides("n_experts", n_experts, "d_ff", d_ff)
        _check_divides("n_kv_heads", n_kv_heads, "n_heads", n_heads)
        if not isinstance(head_norm, bool):
            raise ValueError(f"head_norm: expected a bool, got {head_norm!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating-point torch.dtype (e.g. torch.bfloat16) or None, "
                             f"got {dtype!r}")

        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.d_ff, self.n_experts = d_ff, n_experts
        self.expert_dim = d_ff // n_experts
        self.core_fn: Core | None = None

        factory = dict(device=device, dtype=dtype)
        kuv_shape = (n_kv_heads, n_experts, self.expert_dim, self.head_dim)
        self.w_in = nn.Linear(d_model, d_model, bias=False, **factory)
        self.head_norm = HeadRMSNorm(n_heads, self.head_dim, **factory) if head_norm else None
        self.k = nn.Parameter(torch.empty(kuv_shape, **factory))
        self.u = nn.Parameter(torch.empty(kuv_shape, **factory))
        self.v = nn.Parameter(torch.empty(kuv_shape, **factory))
        self.router = nn.Parameter(torch.empty(n_heads, self.head_dim, n_experts, **factory))
        self.w_out = nn.Linear(d_model, d_model, bias=False, **factory)
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, **kw) -> FlashMHF:
        """The layer of preset ``name`` (see ``fm.PRESETS``); ``kw`` overrides head_norm,
        n_kv_heads, device, dtype."""
        p = get_preset(name)
        kw.setdefault("head_norm", p.head_norm)
        kw.setdefault("n_kv_heads", p.n_kv_heads)
        return cls(p.d_model, p.n_heads, p.d_ff, p.n_experts, **kw)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' init: projections xavier-uniform (gain 0.707), K/U/V normal(0, 0.02),
        router trunc_normal(0, 0.02) with torch's default bounds (±2 absolute, as in their code)."""
        nn.init.xavier_uniform_(self.w_in.weight, gain=PROJ_GAIN)
        nn.init.xavier_uniform_(self.w_out.weight, gain=PROJ_GAIN)
        for w in (self.k, self.u, self.v):
            nn.init.normal_(w, mean=0.0, std=INIT_STD)
        if self.router.is_meta or self.router.dtype in (torch.float32, torch.float64):
            nn.init.trunc_normal_(self.router, mean=0.0, std=INIT_STD)
        else:  # erfinv is missing for 16-bit dtypes on some backends: draw in fp32
            self.router.copy_(nn.init.trunc_normal_(torch.empty_like(self.router, dtype=torch.float32), std=INIT_STD))
        if self.head_norm is not None:
            nn.init.ones_(self.head_norm.weight)

    def route(self, q: torch.Tensor) -> torch.Tensor:
        """Router weights r (..., H, E) in fp32, also under autocast."""
        if layer_eager.autocast_on(q.device.type):
            with torch.autocast(q.device.type, enabled=False):
                return lean_autograd.router(q, self.router)
        return lean_autograd.router(q, self.router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Submodules and parameters straight from the module's dicts: nn.Module.__getattr__ costs host
        # time that a decode call (a few tens of µs in all) notices, ~10 times a call.
        modules, params = self._modules, self._parameters
        w_in, w_out, k = modules.get("w_in"), modules.get("w_out"), params.get("k")
        if self.core_fn is None and layer_eager.usable(x, w_in, w_out, k) and x.shape[-1:] == (self.d_model,):
            # Eager fast path: the same maths in one autograd node (host time at small T).
            norm = modules.get("head_norm")
            norm_w, eps = (None, HEAD_NORM_EPS) if norm is None else (norm._parameters["weight"], norm.eps)
            return layer_eager.layer(x, w_in._parameters["weight"], norm_w, params["router"], k, params["u"],
                                     params["v"], w_out._parameters["weight"], eps)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.d_model,):
            raise ValueError(f"x: expected shape (..., {self.d_model}), got {tuple(x.shape)}")
        weight_dtype = self.w_in.weight.dtype
        if x.dtype != weight_dtype and not layer_eager.autocast_on(x.device.type):
            raise ValueError(f"x: expected dtype {weight_dtype} (the layer's parameters; or run under autocast), "
                             f"got {x.dtype}")
        q = self.w_in(x)
        if self.core_fn is not None:
            s = self._unfused(q)
        else:
            # One op between the projections: generated norm/router kernels around the core.
            # Under autocast q is 16-bit while the weights stay fp32: the kernels take one dtype.
            norm = self.head_norm
            norm_w, w_r, k, u, v = None if norm is None else norm.weight, self.router, self.k, self.u, self.v
            if k.dtype != q.dtype:
                norm_w, w_r, k, u, v = (w if w is None else w.to(q.dtype) for w in (norm_w, w_r, k, u, v))
            s = layer_core(q, norm_w, w_r, k, u, v, HEAD_NORM_EPS if norm is None else norm.eps)
        return self.w_out(s)

    def _unfused(self, q: torch.Tensor) -> torch.Tensor:
        """Norm and router as PyTorch ops around ``core_fn`` (a reference swap of the core)."""
        q = q.unflatten(-1, (self.n_heads, self.head_dim))
        if self.head_norm is not None:
            q = self.head_norm(q)
        r = self.route(q)
        k, u, v = (w.to(q.dtype) for w in (self.k, self.u, self.v))
        return self.core_fn(q, k, u, v, r).flatten(-2)

    def extra_repr(self) -> str:
        kv = f", n_kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, d_ff={self.d_ff}, "
            f"n_experts={self.n_experts}, expert_dim={self.expert_dim}{kv}, "
            f"head_norm={self.head_norm is not None}"
        )
