"""Forward core kernel: grid over (row tiles, kv heads, d_ff splits), one loop over d_ff tiles.

A row is one (token, head-of-the-group) pair, so heads that share a kv head share every weight
tile loaded. With ``split > 1`` each program covers a slice of d_ff and writes fp32 partials that a
second small kernel sums: that fills the GPU at decode sizes, where rows are few.
"""

from __future__ import annotations

from flashmhf.codegen.kinds.base import (
    DTYPE_BYTES,
    MAX_REGS_PER_THREAD,
    SMEM_BYTES,
    Config,
    KernelKind,
    Param,
    cdiv,
    first_accepted,
    next_pow2,
)
from flashmhf.codegen.spec import Spec

# Enough programs to fill a large GPU twice over; beyond this, splitting d_ff only adds traffic.
SPLIT_TARGET_PROGRAMS = 264
# A grid this large already fills the GPU (an H200 has 132 SMs): the default does not split it.
FULL_GRID_PROGRAMS = 100
# TMA descriptors are built on the host per call and the direct launch path does not take them, so
# below this many tokens (where host time per call matters) the forward reads K/U/V through pointers.
TMA_MIN_TOKENS = 1024


def estimate_smem(spec: Spec, c: Config) -> int:
    """Pipelined K/U/V tiles, the resident q tile and the staged activation tile, in bytes."""
    b = DTYPE_BYTES[spec.dtype]
    d_pad = next_pow2(spec.head_dim)
    stages = max(c["num_stages"], 1)
    return stages * 3 * c["block_f"] * d_pad * b + c["block_m"] * d_pad * b + c["block_m"] * c["block_f"] * b


def estimate_regs(spec: Spec, c: Config) -> int:
    """fp32 accumulator plus the two (rows x d_ff-tile) products, per thread, plus fixed overhead."""
    d_pad = next_pow2(spec.head_dim)
    values = c["block_m"] * d_pad + 2 * c["block_m"] * c["block_f"]
    return values // (c["num_warps"] * 32) + 40


def reject(spec: Spec, c: Config, tokens: int | None) -> str | None:
    bm, bf, split = c["block_m"], c["block_f"], c["split"]
    if spec.expert_dim % bf:
        return f"block_f={bf} does not divide expert_dim={spec.expert_dim} (a tile must stay in one sub-network)"
    n_ftiles = spec.d_ff // bf
    if split > n_ftiles:
        return f"split={split} exceeds the {n_ftiles} d_ff tiles"
    if (smem := estimate_smem(spec, c)) > SMEM_BYTES:
        return f"needs ~{smem // 1024} KiB shared memory, more than {SMEM_BYTES // 1024} KiB"
    if (regs := estimate_regs(spec, c)) > MAX_REGS_PER_THREAD:
        return f"needs ~{regs} registers per thread (> {MAX_REGS_PER_THREAD}): would spill"
    if tokens is not None:
        if c["tma"] and tokens < TMA_MIN_TOKENS:
            return f"tma=1 below {TMA_MIN_TOKENS} tokens: per-call descriptors would cost more host time than they save"
        rows = tokens * spec.group
        if bm > max(16, next_pow2(rows)):
            return f"block_m={bm} is larger than the {rows} rows it would cover"
        programs = cdiv(rows, bm) * spec.n_kv_heads
        if split > 1 and programs * split > 2 * SPLIT_TARGET_PROGRAMS:
            return f"split={split} with {programs} programs already: splitting d_ff only adds traffic"
    return None


def default(spec: Spec, tokens: int) -> Config:
    """A safe heuristic from the measured bests: at large T, 128 x 64 tiles through TMA descriptors;
    below that, pointer loads, and split d_ff at small T."""
    rows = max(tokens, 1) * spec.group
    block_m = min(128, max(16, next_pow2(rows)))
    block_f = 64 if spec.expert_dim % 64 == 0 else (32 if spec.expert_dim % 32 == 0 else 16)
    programs = cdiv(rows, block_m) * spec.n_kv_heads
    split = 1
    n_ftiles = spec.d_ff // block_f
    while programs < FULL_GRID_PROGRAMS and programs * split * 2 <= SPLIT_TARGET_PROGRAMS and split * 2 <= n_ftiles:
        split *= 2
    candidates = [
        {"block_m": block_m, "block_f": block_f, "num_warps": 8 if block_m >= 128 else 4, "num_stages": s,
         "split": split, "tma": tma}
        for tma in ((1, 0) if tokens >= TMA_MIN_TOKENS else (0,))
        for s in (3, 2, 1)
    ]
    candidates += [{**c, "block_f": 16, "block_m": min(block_m, 64)} for c in candidates]
    return first_accepted(reject, spec, candidates)


def flops(spec: Spec, tokens: int) -> float:
    return 6.0 * tokens * spec.d_model * spec.d_ff


FWD = KernelKind(
    name="fwd",
    template="fwd.py.jinja",
    description="forward core: s = sum_e r_e (silu(q K_e^T) * q U_e^T) V_e",
    params=(
        Param("block_m", (16, 32, 64, 128, 256), help="rows (token x head-of-group) per program"),
        Param("block_f", (16, 32, 64, 128, 256), help="d_ff columns per loop step"),
        Param("num_warps", (4, 8), help="warps per program"),
        Param("num_stages", (1, 2, 3, 4, 5), log2=False, help="software-pipeline depth"),
        Param("split", (1, 2, 4, 8, 16, 32), help="programs sharing one row tile's d_ff (small T)"),
        Param("tma", (0, 1), log2=False, absent=0, help="1: K/U/V tiles through TMA tensor descriptors (large T)"),
    ),
    reject=reject,
    default=default,
    flops=flops,
)
