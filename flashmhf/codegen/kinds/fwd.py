"""Forward core kernel: grid over (row tiles, kv heads, d_ff splits), one loop over d_ff tiles.

A row is one (token, head-of-the-group) pair, so heads that share a kv head share every weight
tile loaded. With ``split > 1`` each program covers a slice of d_ff and writes fp32 partials that a
second small kernel sums: that fills the GPU at decode sizes, where rows are few.
"""

from __future__ import annotations

from flashmhf.codegen.arch import TMA, Arch
from flashmhf.codegen.kinds.base import (
    DTYPE_BYTES,
    FORWARD,
    Config,
    KernelKind,
    Param,
    cdiv,
    first_accepted,
    fma_product_regs,
    fma_products,
    next_pow2,
    resource_reason,
)
from flashmhf.codegen.spec import Spec

# Programs per SM that a split of d_ff aims at (twice the SMs of the GPU: 264 on an H200's 132);
# beyond that, splitting d_ff only adds traffic.
SPLIT_PROGRAMS_PER_SM = 2
# A grid with this share of the SMs' count of programs already fills the GPU (100 on an H200): the
# default does not split it.
FULL_GRID_SHARE = 0.76
# TMA descriptors are built on the host per call and the direct launch path does not take them, so
# below this many tokens (where host time per call matters) the forward reads K/U/V through pointers.
TMA_MIN_TOKENS = 1024
# Per-thread registers beyond the tiles counted below (addresses, loop state, masks).
REG_OVERHEAD = 40
# With mma.sync (Triton's MMA v2, before Hopper) every warp holds one operand of a product whole:
# with fewer than WARPS_ALONG_M_ROWS rows the warps split the products along their N side and each
# holds all of q; from there on they split the rows and each holds the K/U/V tiles. Calibrated on
# sm_80 compile reports (flashmhf show --resources --capability 80; repo-1.3b, bf16, pointer loads),
# where it accepts exactly the configs that compile without spills.
WARPS_ALONG_M_ROWS = 128
REG_OVERHEAD_MMA_V2 = 24


def estimate_smem(spec: Spec, c: Config) -> int:
    """Pipelined K/U/V tiles, the resident q tile and the staged activation tile, in bytes."""
    b = DTYPE_BYTES[spec.dtype]
    d_pad = next_pow2(spec.head_dim)
    stages = max(c["num_stages"], 1)
    return stages * 3 * c["block_f"] * d_pad * b + c["block_m"] * d_pad * b + c["block_m"] * c["block_f"] * b


def estimate_regs(spec: Spec, c: Config, arch: Arch) -> int:
    """fp32 accumulator plus the two (rows x d_ff-tile) products, per thread, plus fixed overhead;
    with mma.sync also the operand tiles that every warp holds whole."""
    d_pad = next_pow2(spec.head_dim)
    values = c["block_m"] * d_pad + 2 * c["block_m"] * c["block_f"]
    regs = values // (c["num_warps"] * 32)
    if arch.mma != 2:
        return regs + REG_OVERHEAD
    whole = 3 * c["block_f"] if c["block_m"] >= WARPS_ALONG_M_ROWS else c["block_m"]
    return regs + whole * d_pad * DTYPE_BYTES[spec.dtype] // (4 * 32) + REG_OVERHEAD_MMA_V2


def estimate_regs_fma(spec: Spec, c: Config) -> int:
    """Per thread with exact (fp32) products, on every architecture: the counted tiles and the FMA
    operands in place of MMA fragments."""
    d_pad = next_pow2(spec.head_dim)
    values = c["block_m"] * d_pad + 2 * c["block_m"] * c["block_f"]
    return values // (c["num_warps"] * 32) + REG_OVERHEAD + \
        fma_product_regs(c["block_m"], c["block_f"], d_pad, c["num_warps"])


def split_target(arch: Arch) -> int:
    """Programs a split of d_ff aims at on ``arch``."""
    return SPLIT_PROGRAMS_PER_SM * arch.sm_count


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    bm, bf, split = c["block_m"], c["block_f"], c["split"]
    if spec.expert_dim % bf:
        return f"block_f={bf} does not divide expert_dim={spec.expert_dim} (a tile must stay in one sub-network)"
    n_ftiles = spec.d_ff // bf
    if split > n_ftiles:
        return f"split={split} exceeds the {n_ftiles} d_ff tiles"
    if c["tma"] and TMA not in arch.features:
        return f"tma=1 needs TMA tensor descriptors, which {arch.name} does not have"
    reason = resource_reason(estimate_smem(spec, c), estimate_regs(spec, c, arch), arch)
    if reason:
        return reason
    if tokens is not None:
        if c["tma"] and tokens < TMA_MIN_TOKENS:
            return f"tma=1 below {TMA_MIN_TOKENS} tokens: per-call descriptors would cost more host time than they save"
        rows = tokens * spec.group
        if bm > max(16, next_pow2(rows)):
            return f"block_m={bm} is larger than the {rows} rows it would cover"
        programs = cdiv(rows, bm) * spec.n_kv_heads
        if split > 1 and programs * split > 2 * split_target(arch):
            return f"split={split} with {programs} programs already: splitting d_ff only adds traffic"
    return None


def reject_default(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    """``reject``, and with exact (fp32) products the configs whose FMA operands would spill: the
    defaults compile without spills; the tuner still measures such configs."""
    if fma_products(spec) and (reason := resource_reason(0, estimate_regs_fma(spec, c), arch)):
        return reason
    return reject(spec, c, tokens, arch)


def candidates(spec: Spec, tokens: int, arch: Arch, tma: bool = True) -> list[Config]:
    """The default's candidates in order of preference: at large T, 128 x 64 tiles through TMA
    descriptors (where the arch has them and ``tma``); below that, pointer loads of up to 64 rows,
    and split d_ff at small T; then smaller tiles, for where registers or shared memory are short."""
    rows = max(tokens, 1) * spec.group
    full_grid = int(FULL_GRID_SHARE * arch.sm_count)
    large = tma and tokens >= TMA_MIN_TOKENS
    # 128-row tiles through pointers (below TMA_MIN_TOKENS) spill on sm_90 with 64-wide d_ff tiles.
    preferred_m = min(128 if large else 64, max(16, next_pow2(rows)))
    # Masked loads of a head dim that is not a power of two (d_h 96) take more registers: through
    # pointers, 64-wide d_ff tiles spill on sm_90 there (repo-128m), 32-wide ones do not.
    widths = (32, 64, 16) if next_pow2(spec.head_dim) != spec.head_dim and (
        not large or TMA not in arch.features) else (64, 32, 16)
    found = []
    for block_m in (preferred_m, *(bm for bm in (64, 32, 16) if bm < preferred_m)):
        for block_f in (bf for bf in widths if spec.expert_dim % bf == 0):
            programs = cdiv(rows, block_m) * spec.n_kv_heads
            split = 1
            n_ftiles = spec.d_ff // block_f
            while (programs < full_grid and programs * split * 2 <= split_target(arch)
                   and split * 2 <= n_ftiles):
                split *= 2
            found += [
                {"block_m": block_m, "block_f": block_f, "num_warps": warps, "num_stages": s, "split": split,
                 "tma": t}
                for warps in ((8, 4) if block_m >= 128 else (4, 8))
                for t in ((1, 0) if large else (0,))
                for s in (3, 2, 1)
            ]
    return found


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """A safe heuristic from the measured bests (:func:`candidates`): the first that fits ``arch``
    (mma.sync GPUs and 99 KiB parts take smaller tiles)."""
    return first_accepted(reject_default, spec, arch, candidates(spec, tokens, arch), "fwd")


def flops(spec: Spec, tokens: int) -> float:
    return 6.0 * tokens * spec.d_model * spec.d_ff


FWD = KernelKind(
    name="fwd",
    template="fwd.py.jinja",
    description="forward core: s = sum_e r_e (silu(q K_e^T) * q U_e^T) V_e",
    role=FORWARD,
    params=(
        Param("block_m", (16, 32, 64, 128, 256), help="rows (token x head-of-group) per program"),
        Param("block_f", (16, 32, 64, 128, 256), help="d_ff columns per loop step"),
        Param("num_warps", (4, 8), help="warps per program"),
        Param("num_stages", (1, 2, 3, 4, 5), log2=False, help="software-pipeline depth"),
        Param("split", (1, 2, 4, 8, 16, 32), help="programs sharing one row tile's d_ff (small T)"),
        Param("tma", (0, 1), log2=False, absent=0, help="1: K/U/V tiles through TMA tensor descriptors (large T)"),
    ),
    reject_fn=reject,
    default_fn=default,
    flops=flops,
)
