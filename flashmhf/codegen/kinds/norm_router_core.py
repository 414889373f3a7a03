"""The layer between its projections in one kernel: head RMSNorm, router and core forward.

``norm_router_core`` (``router_core`` for a layer without head norm) takes q as the W_in product
leaves it and writes s: per (row tile, kv head, d_ff split) one program normalises its rows,
computes their router weights in registers (one (rows x d_h) x (d_h x E) product) and runs the
core's d_ff loop on them, so qn and r never reach memory. With a split of d_ff the last program
of a row tile sums the splits' partials (counted with an atomic), so a decode step is one launch
instead of three (``norm_router``, the split ``fwd``, its reduction) and needs no qn or r buffers.

The core loop is ``fwd``'s pointer path, so its configs and limits are ``fwd``'s (without TMA);
the norm and router add the logits and the router weights to each program's registers.
"""

from __future__ import annotations

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import fwd
from flashmhf.codegen.kinds.base import (
    DTYPE_BYTES,
    NORM_ROUTER_CORE,
    ROUTER_CORE,
    Config,
    KernelKind,
    Role,
    first_accepted,
    fma_products,
    next_pow2,
    resource_reason,
)
from flashmhf.codegen.kinds.norm_router import e_pad, flops_forward
from flashmhf.codegen.spec import Spec


def _core_config(c: Config) -> Config:
    """The config as ``fwd``'s checks read it (pointer loads)."""
    return {**c, "tma": 0}


def _router_regs(spec: Spec, c: Config) -> int:
    """Per thread beyond ``fwd``'s count: the logits and router weights (BLOCK_M x E_PAD fp32, alive
    through the loop) and the W_r[h] tile (d_h x E_PAD) while the logits are formed."""
    values = 2 * c["block_m"] * e_pad(spec) + next_pow2(spec.head_dim) * e_pad(spec) // 2
    return values // (c["num_warps"] * 32)


def _router_smem(spec: Spec) -> int:
    """The W_r[h] tile staged for its product."""
    return next_pow2(spec.head_dim) * e_pad(spec) * DTYPE_BYTES[spec.dtype]


# The default's limit on (rows x padded d_h) per warp. The norm and router keep qn in more layouts
# than ``fwd`` keeps q (ptxas, repo-1.3b bf16, 64-wide d_ff tiles: 4 warps over 16 rows take 254-255
# registers and spill up to 268 B on sm_90, 52 B on sm_80, where ``fwd`` takes 168-252 without
# spills; 8 warps over 16 rows take 192 / 211 without spills; every config over more rows per warp
# spills on one of them), so ``fwd``'s register model alone would let the default spill.
SAFE_ROW_VALUES_PER_WARP = 256


def _reject(spec: Spec, c: Config, tokens: int | None, arch: Arch, safe: bool) -> str | None:
    core = _core_config(c)
    if reason := (fwd.reject_default if safe else fwd.reject)(spec, core, tokens, arch):
        return reason
    per_warp = c["block_m"] * next_pow2(spec.head_dim) // c["num_warps"]
    if safe and not fma_products(spec) and per_warp > SAFE_ROW_VALUES_PER_WARP:
        return f"{per_warp} row values per warp: the norm and router's copies of qn would spill"
    regs = (fwd.estimate_regs_fma(spec, core) if safe and fma_products(spec) else fwd.estimate_regs(spec, core, arch))
    return resource_reason(fwd.estimate_smem(spec, core) + _router_smem(spec), regs + _router_regs(spec, c), arch)


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return _reject(spec, c, tokens, arch, safe=False)


def _reject_default(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return _reject(spec, c, tokens, arch, safe=True)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """``fwd``'s pointer-path preferences (split d_ff at decode sizes) that fit with the router too."""
    found = [{k: v for k, v in c.items() if k != "tma"} for c in fwd.candidates(spec, tokens, arch, tma=False)]
    return first_accepted(_reject_default, spec, arch, found, spec.kind)


def flops(spec: Spec, tokens: int) -> float:
    return fwd.flops(spec, tokens) + flops_forward(spec, tokens)


_PARAMS = tuple(p for p in fwd.FWD.params if p.name != "tma")


def _kind(name: str, role: Role, what: str) -> KernelKind:
    return KernelKind(name=name, template="norm_router_core.py.jinja", description=what, role=role, params=_PARAMS,
                      reject_fn=reject, default_fn=default, flops=flops)


NORM_ROUTER_CORE_KIND = _kind("norm_router_core", NORM_ROUTER_CORE,
                              "layer: head RMSNorm, router and core forward in one kernel (split d_ff summed in it)")
ROUTER_CORE_KIND = _kind("router_core", ROUTER_CORE,
                         "layer without head norm: router and core forward in one kernel (split d_ff summed in it)")
