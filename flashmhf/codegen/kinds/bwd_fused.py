"""Backward core kernel in one pass: bwd_dkuv's grid and loop, plus dq and dr by fp32 atomics.

Per row tile: m, n, da recomputed, dV, dK, dU, and dm K_e + dn U_e for dq: 8 GEMMs instead of the
11 of bwd_dq + bwd_dkuv. The price: a (T, H, d_h) fp32 workspace for dq (a (T, H, E) one for dr when
r is 16-bit), D_FF / BLOCK_F atomic adds per dq element, and a dq that is not bit-for-bit
deterministic. It therefore does NOT meet the backward's memory target (outputs only, no
workspace); it is a kind for the tuner to weigh against the pair, not what the op runs by default.
"""

from __future__ import annotations

import inspect

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import bwd_common, bwd_dkuv, bwd_dq
from flashmhf.codegen.kinds.base import BACKWARD, DTYPE_BYTES, Config, KernelKind, Param, first_accepted, next_pow2
from flashmhf.codegen.kinds.bwd_common import REG_OVERHEAD, block_f_choices, common_reject, row_tile
from flashmhf.codegen.spec import Spec


def estimate_smem(spec: Spec, c: Config) -> int:
    """bwd_dkuv's (resident K/U/V, pipelined q/ds, staged ra/dm/dn) plus the transposed dm/dn tiles."""
    b = DTYPE_BYTES[spec.dtype]
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    stages = max(c["num_stages"], 1)
    return 3 * bf * d_pad * b + stages * 2 * bm * d_pad * b + 5 * bf * bm * b


def estimate_regs(spec: Spec, c: Config, arch: Arch) -> int:
    """Three fp32 (d_ff-tile x d_h) accumulators, the three products and the (rows x d_h) dq tile;
    with mma.sync also the tiles each warp holds whole."""
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    tiles = (3 * bf * d_pad + 3 * bf * bm + bm * d_pad) // (c["num_warps"] * 32)
    if arch.mma == 2:  # bwd_dkuv's loop plus the dq products
        return tiles + bwd_dkuv.estimate_regs_mma_v2(spec, c) + bwd_dq.estimate_regs_mma_v2(spec, c)
    return tiles + REG_OVERHEAD


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return common_reject(spec, c, tokens, estimate_smem(spec, c), estimate_regs(spec, c, arch), arch)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """64-wide d_ff tiles, up to 32 rows per step (the dq tile adds registers), 8 warps."""
    preferred = row_tile(tokens, spec, 32)
    return first_accepted(reject, spec, arch, (
        {"block_f": bf, "block_m": bm, "num_warps": warps, "num_stages": stages}
        for bf in block_f_choices(spec)
        for bm in (preferred, *(b for b in (16,) if b < preferred))
        for warps in (8, 4)
        for stages in (3, 2, 1)
    ), "bwd_fused")


def flops(spec: Spec, tokens: int) -> float:
    """Executed FLOPs: 8 GEMMs of 2*T*d_model*d_ff each."""
    return 16.0 * tokens * spec.d_model * spec.d_ff


BWD_FUSED = KernelKind(
    name="bwd_fused",
    template="bwd_fused.py.jinja",
    description="backward in one pass: dK, dU, dV per d_ff tile plus dq, dr by fp32 atomics (needs a workspace)",
    role=BACKWARD,
    params=(
        Param("block_f", (16, 32, 64, 128), help="d_ff rows of K/U/V per program"),
        Param("block_m", (16, 32, 64, 128), help="rows (token x head-of-group) per loop step"),
        Param("num_warps", (4, 8), help="warps per program"),
        Param("num_stages", (1, 2, 3, 4), log2=False, help="software-pipeline depth"),
    ),
    reject_fn=reject,
    default_fn=default,
    flops=flops,
    extra_hash=(inspect.getsource(bwd_common),),
)
