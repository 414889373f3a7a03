"""Backward core kernel, part 1 (dq, dr), warp-specialized for Hopper GPUs (Gluon).

The same results as ``bwd_dq`` from one program per 128 tokens of one head: two 64-row warp groups
each recompute m, n, da and accumulate dq on their own rows, sharing a ring of K/U/V tiles that one
TMA warp fills; while one group computes its elementwise terms, the other's products keep the tensor
cores busy. For large token counts (training); below ``hopper.MIN_TOKENS`` the op runs ``bwd_dq``.

Needs an NVIDIA Hopper GPU and 16-bit inputs (``hopper``). Takes d_h = 96 as column parts of 64 and 32,
as ``fwd_ws`` does (m, n and da as chained MMAs over K = 64 and 32, dq in two accumulators).
"""

from __future__ import annotations

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import bwd_dq, hopper
from flashmhf.codegen.kinds.base import DQ, DTYPE_BYTES, Config, KernelKind, Param
from flashmhf.codegen.spec import Spec

ROWS, TILE = 64, hopper.TILE  # rows per warp group (a program covers two) and d_ff columns per step


def estimate_smem(spec: Spec, c: Config) -> int:
    """Two q and two ds tiles, the K/U/V ring, and the barriers (d_h = 96: one buffer per column part,
    together as wide as the head)."""
    b = DTYPE_BYTES[spec.dtype]
    d = spec.head_dim
    return 4 * ROWS * d * b + c["num_stages"] * 3 * TILE * d * b + 1024


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return hopper.reject(spec, "bwd_dq", estimate_smem(spec, c), arch, hopper.SPLIT_HEAD_DIMS)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """A 3-slot K/U/V ring where it fits, else 2; ping-pong.

    Measured on an H200 (repo-1.3b, bf16, T = 16384; docs/benchmarks/2026-11-29-fast-sigmoid.md):
    3.00 ms, 3.04 without ping-pong in the same run; bwd_dq's best config 3.44-3.50."""
    return hopper.default("bwd_dq_ws", spec, "bwd_dq", reject, arch,
                          ({"num_stages": n, "pingpong": 1} for n in (3, 2)), hopper.SPLIT_HEAD_DIMS)


BWD_DQ_WS = KernelKind(
    name="bwd_dq_ws",
    template="bwd_dq_ws.py.jinja",
    description="backward dq, dr for Hopper: warp-specialized (two 64-row warp groups + TMA warp), Gluon",
    role=DQ,
    params=(
        Param("num_stages", (2, 3, 4), log2=False, help="slots of the K/U/V ring"),
        Param("pingpong", (0, 1), log2=False, help="1: the two row groups take turns to issue their products"),
    ),
    reject_fn=reject,
    default_fn=default,
    flops=bwd_dq.flops,
    needs=hopper.NEEDS,
    min_tokens=hopper.MIN_TOKENS,
    fallback="bwd_dq",
)
