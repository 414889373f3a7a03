"""Backward core kernel, part 2: dK, dU, dV. Grid over (d_ff tiles, kv heads), loop over rows.

A program owns one BLOCK_F slice of d_ff of one kv head (inside one sub-network e): its K/U/V tiles
stay resident and its dK/dU/dV tiles accumulate in fp32 registers over every row (token x
head-of-the-group) of that kv head, so the sum over tokens and over the heads sharing the kv head
needs no atomics and no workspace; each is stored once in the weights' dtype. Per row tile:
m, n, da recomputed, then dV, dK, dU: 6 GEMMs.
"""

from __future__ import annotations

import inspect

from flashmhf.codegen.kinds import bwd_common
from flashmhf.codegen.kinds.base import DTYPE_BYTES, Config, KernelKind, Param, first_accepted, next_pow2
from flashmhf.codegen.kinds.bwd_common import REG_OVERHEAD, block_f_choices, common_reject, row_tile
from flashmhf.codegen.spec import Spec


def estimate_smem(spec: Spec, c: Config) -> int:
    """Resident K/U/V tiles, pipelined q and ds tiles and the three staged (ra, dm, dn) tiles."""
    b = DTYPE_BYTES[spec.dtype]
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    stages = max(c["num_stages"], 1)
    return 3 * bf * d_pad * b + stages * 2 * bm * d_pad * b + 3 * bf * bm * b


def estimate_regs(spec: Spec, c: Config) -> int:
    """Three fp32 (d_ff-tile x d_h) accumulators plus the three (d_ff-tile x rows) products."""
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    return (3 * bf * d_pad + 3 * bf * bm) // (c["num_warps"] * 32) + REG_OVERHEAD


def reject(spec: Spec, c: Config, tokens: int | None) -> str | None:
    return common_reject(spec, c, tokens, estimate_smem(spec, c), estimate_regs(spec, c))


def default(spec: Spec, tokens: int) -> Config:
    """32-wide d_ff tiles, up to 64 rows per step, 4 warps, the deepest pipeline that fits.

    Measured on an H200 (repo-1.3b, T=16384, bf16): 32x64 with 4 warps and 3 stages 7.76 ms,
    against 15.0 ms for 64x64 with 8 warps (docs/benchmarks/2026-11-29-backward.md)."""
    preferred = row_tile(tokens, spec, 64)
    widths = sorted(block_f_choices(spec), key=lambda bf: (bf != 32, -bf))
    return first_accepted(reject, spec, (
        {"block_f": bf, "block_m": bm, "num_warps": warps, "num_stages": stages}
        for bf in widths
        for bm in (preferred, *(b for b in (32, 16) if b < preferred))
        for warps in (4, 8)
        for stages in (3, 2, 1)
    ))


def flops(spec: Spec, tokens: int) -> float:
    """Executed FLOPs: 6 GEMMs of 2*T*d_model*d_ff each (m, n, da recomputed; dV, dK, dU)."""
    return 12.0 * tokens * spec.d_model * spec.d_ff


BWD_DKUV = KernelKind(
    name="bwd_dkuv",
    template="bwd_dkuv.py.jinja",
    description="backward dK, dU, dV: per d_ff tile, loop over all rows of the kv head, fp32 accumulators",
    params=(
        Param("block_f", (16, 32, 64, 128), help="d_ff rows of K/U/V per program"),
        Param("block_m", (16, 32, 64, 128, 256), help="rows (token x head-of-group) per loop step"),
        Param("num_warps", (4, 8), help="warps per program"),
        Param("num_stages", (1, 2, 3, 4, 5), log2=False, help="software-pipeline depth"),
    ),
    reject=reject,
    default=default,
    flops=flops,
    extra_hash=(inspect.getsource(bwd_common),),
)
