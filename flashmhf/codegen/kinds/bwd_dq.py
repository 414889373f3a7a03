"""Backward core kernel, part 1: dq and dr. Grid over (row tiles, kv heads), one loop over d_ff tiles.

Rows are (token, head-of-the-group) pairs as in the forward. Each d_ff tile recomputes
m = q K_e^T, n = q U_e^T and da = ds V_e^T, then adds dm K_e + dn U_e to the fp32 dq tile: 5 GEMMs
per tile. dr[t, h, e] is a row sum accumulated over the tiles of sub-network e and stored when its
last tile is done. No workspace: the kernel writes only dq and dr.
"""

from __future__ import annotations

import inspect

from flashmhf.codegen.arch import TMA, Arch
from flashmhf.codegen.kinds import bwd_common
from flashmhf.codegen.kinds.base import (
    DQ,
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
from flashmhf.codegen.kinds.bwd_common import REG_OVERHEAD, block_f_choices, common_reject, row_tile
from flashmhf.codegen.spec import Spec

REG_OVERHEAD_MMA_V2 = 20
# Exact (fp32) products without TMA (before Hopper): each pipeline stage beyond the first holds this
# many more. 16 x 16 tiles, 8 warps on sm_80 and sm_86: 2 stages compile without spills, 3 spill.
FMA_STAGE_REGS = 40


def estimate_smem(spec: Spec, c: Config) -> int:
    """Pipelined K/U/V tiles and the resident q and ds tiles, in bytes (dm and dn feed their GEMMs from
    registers). ptxas, repo-1.3b bf16, 128 x 64 with 3 stages: 214,552 B; this gives 212,992."""
    b = DTYPE_BYTES[spec.dtype]
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    stages = max(c["num_stages"], 1)
    return stages * 3 * bf * d_pad * b + 2 * bm * d_pad * b


def estimate_regs(spec: Spec, c: Config, arch: Arch) -> int:
    """fp32 dq accumulator plus the three (rows x d_ff-tile) products m, n, da, per thread; with
    mma.sync see ``estimate_regs_mma_v2``."""
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    tiles = (bm * d_pad + 3 * bm * bf) // (c["num_warps"] * 32)
    if arch.mma == 2:
        return tiles + estimate_regs_mma_v2(spec, c)
    return tiles + REG_OVERHEAD


def estimate_regs_mma_v2(spec: Spec, c: Config) -> int:
    """Registers beyond the counted tiles with mma.sync (MMA v2, before Hopper), where the warps split
    the products along N: each warp holds the q and ds tiles whole, and the K/U/V operand fragments
    grow with the d_ff tile per warp. Calibrated on sm_80 compile reports (flashmhf show --resources
    --capability 80; repo-1.3b, bf16, 72 configs): it accepts those that compile without spills but
    32 x 32 tiles with 8 warps, which spill on sm_86 and sm_89."""
    words = next_pow2(spec.head_dim) * DTYPE_BYTES[spec.dtype] // 4  # 32-bit registers per tile row
    bm, bf, warps = c["block_m"], c["block_f"], c["num_warps"]
    return 2 * bm * words // 32 + 10 * bf * words // (32 * warps) + REG_OVERHEAD_MMA_V2


def estimate_regs_fma(spec: Spec, c: Config, arch: Arch) -> int:
    """Per thread with exact (fp32) products, on every architecture: the counted tiles, the FMA
    operands in place of MMA fragments and, without TMA, the pipeline's stages."""
    d_pad = next_pow2(spec.head_dim)
    bm, bf = c["block_m"], c["block_f"]
    tiles = (bm * d_pad + 3 * bm * bf) // (c["num_warps"] * 32)
    stages = 0 if TMA in arch.features else FMA_STAGE_REGS * (max(c["num_stages"], 1) - 1)
    return tiles + REG_OVERHEAD + fma_product_regs(bm, bf, d_pad, c["num_warps"]) + stages


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return common_reject(spec, c, tokens, estimate_smem(spec, c), estimate_regs(spec, c, arch), arch)


def reject_default(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    """``reject``, and with exact (fp32) products the configs whose FMA operands would spill: the
    defaults compile without spills; the tuner still measures such configs."""
    if fma_products(spec) and (reason := resource_reason(0, estimate_regs_fma(spec, c, arch), arch)):
        return reason
    return reject(spec, c, tokens, arch)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """Up to 128 rows per program, 64-wide d_ff tiles, the deepest pipeline that fits, 8 warps for
    128 rows (and on mma.sync GPUs, where a warp holds whole tiles) else 4; the other warp count
    where none of those fits."""
    preferred = row_tile(tokens, spec, 128)

    def candidates(first_choice: bool):
        for bm in (preferred, *(b for b in (64, 32, 16) if b < preferred)):
            warps = 8 if bm >= 128 or arch.mma == 2 else 4
            for bf in block_f_choices(spec):
                for stages in (3, 2, 1):
                    yield {"block_m": bm, "block_f": bf, "num_warps": warps if first_choice else 12 - warps,
                           "num_stages": stages}

    return first_accepted(reject_default, spec, arch, (*candidates(True), *candidates(False)), "bwd_dq")


def flops(spec: Spec, tokens: int) -> float:
    """Executed FLOPs: 5 GEMMs of 2*T*d_model*d_ff each (m, n, da recomputed; dm K and dn U)."""
    return 10.0 * tokens * spec.d_model * spec.d_ff


BWD_DQ = KernelKind(
    name="bwd_dq",
    template="bwd_dq.py.jinja",
    description="backward dq, dr: recompute q K_e^T, q U_e^T, ds V_e^T per d_ff tile; dq += dm K_e + dn U_e",
    role=DQ,
    params=(
        Param("block_m", (16, 32, 64, 128, 256), help="rows (token x head-of-group) per program"),
        Param("block_f", (16, 32, 64, 128, 256), help="d_ff columns per loop step"),
        Param("num_warps", (4, 8), help="warps per program"),
        Param("num_stages", (1, 2, 3, 4, 5), log2=False, help="software-pipeline depth"),
    ),
    reject_fn=reject,
    default_fn=default,
    flops=flops,
    extra_hash=(inspect.getsource(bwd_common),),
)
