"""The core op ``flash_mhf``: generated Triton kernels on CUDA (and under TRITON_INTERPRET=1 on CPU),
the plain-PyTorch reference elsewhere. Registered as the torch custom op ``flashmhf::core`` so that
torch.compile and CUDA graphs see one opaque node; eager inference calls skip the dispatcher."""

from __future__ import annotations

import functools

import torch

from flashmhf.cache.device import interpreting
from flashmhf.codegen import Config
from flashmhf_runtime import dispatch, reference
from flashmhf_runtime.validation import DTYPE_NAMES, check_core_inputs

_INTERPRET = interpreting()


def uses_kernels(device: torch.device) -> bool:
    """Generated kernels run on CUDA, and on CPU only under Triton's interpreter."""
    return device.type == "cuda" or (_INTERPRET and device.type == "cpu")


def _reference_forward(q, k, u, v, r) -> torch.Tensor:
    # 16-bit math on CPU is slow and inexact: compute in fp32 (or better) and cast back.
    wide = torch.promote_types(q.dtype, torch.float32)
    return reference.flash_mhf(q.to(wide), k.to(wide), u.to(wide), v.to(wide), r.to(wide)).to(q.dtype)


def as_rows(t: torch.Tensor, last_two: tuple[int, int]) -> torch.Tensor:
    """View ``t`` as (T, *last_two) with unit stride in the last dim, copying only if it must."""
    t3 = t.reshape(-1, *last_two)
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def core_forward(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, config: Config | None
) -> torch.Tensor:
    """Validated forward without autograd: s shaped like q."""
    n_heads, n_kv, head_dim, n_exp, d_e = check_core_inputs(q, k, u, v, r)
    if not uses_kernels(q.device):
        return _reference_forward(q, k, u, v, r)
    q3 = as_rows(q, (n_heads, head_dim))
    r3 = as_rows(r, (n_heads, n_exp))
    k, u, v = (w if w.is_contiguous() else w.contiguous() for w in (k, u, v))
    n_tokens = q3.shape[0]
    out = torch.empty((n_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if n_tokens:
        spec_key = ("fwd", n_heads, n_kv, head_dim, n_exp, d_e, DTYPE_NAMES[q.dtype])
        if config is None:
            dispatch.launch(spec_key, n_tokens, q.device.index, q3, k, u, v, r3, out)
        else:
            dispatch.launch_with_config(spec_key, config, q3, k, u, v, r3, out)
    return out.view(q.shape)


def config_to_str(config: Config | None) -> str:
    return "" if not config else ",".join(f"{k}={int(v)}" for k, v in sorted(config.items()))


@functools.lru_cache(maxsize=256)
def config_from_str(text: str) -> Config | None:
    if not text:
        return None
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


@torch.library.custom_op("flashmhf::core", mutates_args=())
def core_op(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, config: str) -> torch.Tensor:
    return core_forward(q, k, u, v, r, config_from_str(config))


@core_op.register_fake
def _core_op_fake(q, k, u, v, r, config):
    check_core_inputs(q, k, u, v, r)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _needs_graph(tensors: tuple[torch.Tensor, ...]) -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def flash_mhf(
    q: torch.Tensor,
    k: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    *,
    config: Config | None = None,
) -> torch.Tensor:
    """FlashMHF core: ``s[t,h] = sum_e r[t,h,e] (silu(q K_e^T) * q U_e^T) V_e`` for each token and head.

    q: (..., H, d_h); k, u, v: (H_kv, E, d_e, d_h); r: (..., H, E), fp32 or q's dtype. Returns s
    shaped like q. ``config`` pins a kernel config (see ``flashmhf show``); by default the tuned one
    for this GPU and token count is used, else a safe default.
    """
    if _needs_graph((q, k, u, v, r)):
        return core_op(q, k, u, v, r, config_to_str(config))
    return core_forward(q, k, u, v, r, config)
