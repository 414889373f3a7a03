"""Helpers shared by the backward kinds (bwd_dq, bwd_dkuv, bwd_fused)."""

from __future__ import annotations

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds.base import Config, next_pow2, resource_reason
from flashmhf.codegen.spec import Spec

# Fixed per-thread register overhead (addresses, loop state, masks) on top of the tiles we count.
REG_OVERHEAD = 40


def block_f_choices(spec: Spec) -> tuple[int, ...]:
    """d_ff tile sizes that divide d_e (a tile must stay inside one sub-network), largest first."""
    return tuple(bf for bf in (64, 32, 16) if spec.expert_dim % bf == 0)


def row_tile(tokens: int, spec: Spec, cap: int) -> int:
    """Rows (token x head-of-group) per tile: a power of two in [16, cap] covering the rows if few."""
    rows = max(tokens, 1) * spec.group
    return min(cap, max(16, next_pow2(rows)))


def common_reject(
    spec: Spec, c: Config, tokens: int | None, smem: int, regs: int, arch: Arch
) -> str | None:
    """The checks every backward kind makes: tile inside a sub-network, resources, tile vs rows."""
    bf, bm = c["block_f"], c["block_m"]
    if spec.expert_dim % bf:
        return f"block_f={bf} does not divide expert_dim={spec.expert_dim} (a tile must stay in one sub-network)"
    reason = resource_reason(smem, regs, arch)
    if reason:
        return reason
    if tokens is not None:
        rows = tokens * spec.group
        if bm > max(16, next_pow2(rows)):
            return f"block_m={bm} is larger than the {rows} rows it would cover"
    return None
