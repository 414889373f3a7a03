"""Backward core kernel, part 2: dK, dU, dV. Grid over (d_ff tiles, kv heads), loop over rows.

A program owns one BLOCK_F slice of d_ff of one kv head (inside one sub-network e): its K/U/V tiles
stay resident in shared memory (loaded through TMA descriptors) and its dK/dU/dV tiles accumulate in
fp32 registers over every token of every head of the group, so the sums need no atomics and no
workspace; each is stored once in the weights' dtype.

Structural choices: ``split_dv=1`` runs two kernels (dK, dU: m, n, da recomputed + 2 GEMMs; dV: m, n
recomputed + 1 GEMM = 8 GEMMs per row tile) instead of one (6 GEMMs, three fp32 accumulators live
at once); ``rows_major=1`` puts the rows on the M side of the recomputed products.
"""

from __future__ import annotations

import inspect

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import bwd_common
from flashmhf.codegen.kinds.base import (
    DKUV,
    DTYPE_BYTES,
    Config,
    KernelKind,
    Param,
    first_accepted,
    fma_product_regs,
    fma_products,
    next_pow2,
    resource_reason,
)
from flashmhf.codegen.kinds.bwd_common import block_f_choices, common_reject
from flashmhf.codegen.spec import Spec

# Per-thread registers beyond the tiles counted below. Calibrated on sm_90 compile reports
# (flashmhf show --resources): with TMA tiles there are no address tensors, so less than the other
# kinds' 40; 64x16 tiles, one kernel, 4 warps (estimate 252) compile to 255 registers and no spills,
# 64x32 (276) spill 172 bytes.
REG_OVERHEAD = 36
REG_OVERHEAD_MMA_V2 = 8  # beyond the terms of estimate_regs_mma_v2
# A head dim that is not a power of two (masked stores) costs a few more: repo-128m (d_h 96) spills
# 4 bytes with 64 x 16 tiles, 4 warps (estimate 252 without this).
MASKED_D_REGS = 8


def _passes(c: Config) -> tuple[tuple[int, int], ...]:
    """(dK/dU accumulators, dV accumulator) of each kernel a config launches."""
    return ((1, 0), (0, 1)) if c["split_dv"] else ((1, 1),)


def estimate_smem(spec: Spec, c: Config) -> int:
    """Largest pass: resident weight tiles (K, U, and V for dK/dU), pipelined q and ds tiles, and
    with ``rows_major`` the transposed (rows x d_ff-tile) operand staged for the accumulating GEMMs."""
    b = DTYPE_BYTES[spec.dtype]
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    stages = max(c["num_stages"], 1)
    staged = bf * bm * b if c["rows_major"] else 0
    return max((2 + dku) * bf * d_pad * b + stages * 2 * bm * d_pad * b + staged for dku, _ in _passes(c))


def estimate_regs(spec: Spec, c: Config, arch: Arch) -> int:
    """Largest pass: its fp32 (d_ff-tile x d_h) accumulators plus the (d_ff-tile x rows) products
    m, n (and da for dK/dU) it keeps live; with mma.sync see ``estimate_regs_mma_v2``."""
    tiles = _tile_regs(spec, c)
    if arch.mma == 2:
        return tiles + estimate_regs_mma_v2(spec, c)
    return tiles + REG_OVERHEAD + _masked_regs(spec)


def _tile_regs(spec: Spec, c: Config) -> int:
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    return max(((2 * dku + dv) * bf * d_pad + (2 + dku) * bf * bm) // (c["num_warps"] * 32) for dku, dv in _passes(c))


def _masked_regs(spec: Spec) -> int:
    return MASKED_D_REGS if next_pow2(spec.head_dim) != spec.head_dim else 0


def estimate_regs_fma(spec: Spec, c: Config) -> int:
    """Per thread with exact (fp32) products, on every architecture: the counted tiles and the FMA
    operands in place of MMA fragments."""
    fma = fma_product_regs(c["block_f"], c["block_m"], next_pow2(spec.head_dim), c["num_warps"])
    return _tile_regs(spec, c) + REG_OVERHEAD + _masked_regs(spec) + fma


def estimate_regs_mma_v2(spec: Spec, c: Config) -> int:
    """Registers beyond the counted tiles with mma.sync (MMA v2, before Hopper): a K/U/V tile each
    warp holds whole, and fragments that grow with the tokens per warp (the warps split the recomputed
    products along the token side). Calibrated on sm_80 compile reports (flashmhf show --resources
    --capability 80; repo-1.3b, bf16, 48 configs): it accepts none that spills, and 28 of the 31
    that do not."""
    words = next_pow2(spec.head_dim) * DTYPE_BYTES[spec.dtype] // 4  # 32-bit registers per tile row
    return words * c["block_f"] // 32 + 3 * words * c["block_m"] // (8 * c["num_warps"]) + REG_OVERHEAD_MMA_V2


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return common_reject(spec, c, tokens, estimate_smem(spec, c), estimate_regs(spec, c, arch), arch)


def reject_default(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    """``reject``, and with exact (fp32) products the configs whose FMA operands would spill: the
    defaults compile without spills; the tuner still measures such configs."""
    if fma_products(spec) and (reason := resource_reason(0, estimate_regs_fma(spec, c), arch)):
        return reason
    return reject(spec, c, tokens, arch)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """One kernel, 64-wide d_ff tiles (a Hopper warpgroup MMA's M side), 16 tokens per step, 4 warps,
    4 stages; narrower or split forms only where d_e or the resources need them.

    Measured on an H200 (repo-1.3b, T = 16384, bf16; docs/benchmarks/2026-11-29-backward-v2.md):
    6.49 ms, against 7.27 ms for the best split form (64x32) and 7.64 ms for the tuned
    pointer-load kernel this template replaced."""
    widths = sorted(block_f_choices(spec), key=lambda bf: (bf != 64, -bf))
    return first_accepted(reject_default, spec, arch, (
        {"block_f": bf, "block_m": bm, "num_warps": warps, "num_stages": stages, "split_dv": split,
         "rows_major": 0}
        for bf in widths
        for split in (0, 1)
        for warps in ((4, 8) if arch.mma != 2 else (8, 4))
        for bm in (16, 32)
        for stages in (4, 3, 2, 1)
    ), "bwd_dkuv")


def flops(spec: Spec, tokens: int) -> float:
    """Useful FLOPs of the single-kernel form: 6 GEMMs of 2*T*d_model*d_ff each (m, n, da recomputed;
    dV, dK, dU). ``split_dv`` executes 8 (m and n twice) for the same result."""
    return 12.0 * tokens * spec.d_model * spec.d_ff


BWD_DKUV = KernelKind(
    name="bwd_dkuv",
    template="bwd_dkuv.py.jinja",
    description="backward dK, dU, dV: per d_ff tile, loop over all rows of the kv head, fp32 accumulators, TMA tiles",
    role=DKUV,
    params=(
        Param("block_f", (16, 32, 64, 128), help="d_ff rows of K/U/V per program"),
        Param("block_m", (16, 32, 64, 128, 256), help="tokens per loop step (of each head of the group in turn)"),
        Param("num_warps", (4, 8), help="warps per program"),
        Param("num_stages", (1, 2, 3, 4, 5), log2=False, help="software-pipeline depth"),
        Param("split_dv", (0, 1), log2=False, help="1: dK/dU and dV in two kernels (fewer live accumulators)"),
        Param("rows_major", (0, 1), log2=False, help="1: rows on the M side of the recomputed products"),
    ),
    reject_fn=reject,
    default_fn=default,
    flops=flops,
    extra_hash=(inspect.getsource(bwd_common),),
)
