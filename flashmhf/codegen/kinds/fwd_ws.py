"""Forward core kernel, warp-specialized for Hopper GPUs (Gluon).

The same result as ``fwd`` from one program per 128 tokens of one head: two 64-row warp groups
each compute m, n, the gate and s += a V on their own rows, sharing a ring of K/U/V tiles that one
TMA warp fills; while one group computes its gate the other's products keep the tensor cores busy.
For large token counts (training, prefill); decode sizes stay on ``fwd`` (split d_ff, direct launch).

Needs an NVIDIA Hopper GPU and 16-bit inputs (``hopper``). Takes d_h = 96 as well as the powers of
two: as column parts of 64 and 32 (two TMA boxes and buffers per tile, m and n as two chained MMAs
over K = 64 and 32, s in two accumulators of N = 64 and 32), so no tensor-core work is padded.
"""

from __future__ import annotations

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import fwd, hopper
from flashmhf.codegen.kinds.base import DTYPE_BYTES, FORWARD, Config, KernelKind, Param
from flashmhf.codegen.spec import Spec

ROWS = 64  # rows per warp group; a program covers two groups
PREFERRED_TILES = ((128, 2), (64, 3), (64, 2))  # (block_f, num_stages), best first (see ``default``)


def estimate_smem(spec: Spec, c: Config) -> int:
    """Two q tiles, the K/U/V ring, and the barriers. A head split into column parts (d_h = 96) has
    one buffer per part, together exactly as wide as the head: the same bytes."""
    b = DTYPE_BYTES[spec.dtype]
    d = spec.head_dim
    return 2 * ROWS * d * b + c["num_stages"] * 3 * c["block_f"] * d * b + 1024


def shape_reason(spec: Spec) -> str | None:
    """Why the kind cannot take this layer shape and dtype at all (``None`` = it can)."""
    return hopper.shape_reason(spec, "fwd", hopper.SPLIT_HEAD_DIMS)


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    bf = c["block_f"]
    if spec.expert_dim % bf and not shape_reason(spec):
        return f"block_f={bf} does not divide expert_dim={spec.expert_dim} (a tile must stay in one sub-network)"
    return hopper.reject(spec, "fwd", estimate_smem(spec, c), arch, hopper.SPLIT_HEAD_DIMS)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """128-wide d_ff tiles in a 2-slot ring where d_e allows, else 64-wide ones in 3 slots.

    Measured on an H200 (repo-1.3b, bf16, T = 16384; docs/benchmarks/2026-11-29-fast-sigmoid.md):
    1.83 ms, 64-wide tiles in 3 slots 1.80 (the tuner's pick); before the fast sigmoid 2.02 against
    2.27 for fwd's best config."""
    candidates = ({"block_f": bf, "num_stages": stages} for bf, stages in PREFERRED_TILES)
    return hopper.default("fwd_ws", spec, "fwd", reject, arch, candidates, hopper.SPLIT_HEAD_DIMS)


FWD_WS = KernelKind(
    name="fwd_ws",
    template="fwd_ws.py.jinja",
    description="forward core for Hopper: warp-specialized (two 64-row warp groups + TMA warp), Gluon",
    role=FORWARD,
    params=(
        Param("block_f", (64, 128), help="d_ff columns per loop step (64: q is held in registers)"),
        Param("num_stages", (2, 3, 4), log2=False, help="slots of the K/U/V ring"),
    ),
    reject_fn=reject,
    default_fn=default,
    flops=fwd.flops,
    needs=hopper.NEEDS,
    min_tokens=hopper.MIN_TOKENS,
    fallback="fwd",
)
