"""Backward core kernel, part 2 (dK, dU, dV), warp-specialized for Hopper GPUs (Gluon).

The same results as ``bwd_dkuv`` from one program per 64-row slice of d_ff of one kv head, but the
program's warps split the work: a "gate" warp group recomputes m and n, hands the coefficients of dm
and dn to a "grad" warp group through shared memory and accumulates dV; the grad group computes da
and accumulates dK and dU; one warp issues the TMA loads. Each group holds at most two fp32
accumulators, so a step covers 64 tokens instead of 16, and the two groups' products overlap.

Takes d_h = 96 as well as the powers of two: as column parts of 64 and 32 (two TMA boxes and
buffers per tile, m, n and da as two chained MMAs over K = 64 and 32, dV, dK and dU in two
accumulators each, N = 64 and 32), so no tensor-core work is padded; in whole steps only (halves=0).

Needs an NVIDIA Hopper GPU (warp-group MMA and TMA: ``hopper.NEEDS``) and 16-bit inputs; it cannot
run under Triton's interpreter. Where it cannot run, its fallback ``bwd_dkuv`` does.
"""

from __future__ import annotations

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import bwd_dkuv, hopper
from flashmhf.codegen.kinds.base import DKUV, DTYPE_BYTES, Config, KernelKind, Param
from flashmhf.codegen.spec import Spec

BLOCK_F = 64  # d_ff rows per program (the M side of one warp group's MMA)


def estimate_smem(spec: Spec, c: Config) -> int:
    """K/U/V tiles, the q/ds ring, the two double-buffered coefficient tiles, and the barriers."""
    b = DTYPE_BYTES[spec.dtype]
    d, bm = spec.head_dim, c["block_m"]  # a head in column parts (d_h = 96) takes the same bytes
    coef = 4 if c["coef_fp32"] else b
    return 3 * BLOCK_F * d * b + c["num_stages"] * 2 * bm * d * b + 2 * 2 * BLOCK_F * bm * coef + 1024


def shape_reason(spec: Spec) -> str | None:
    """Why the kind cannot take this layer shape and dtype at all (``None`` = it can)."""
    return hopper.shape_reason(spec, "bwd_dkuv", hopper.SPLIT_HEAD_DIMS)


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    if c["halves"] and spec.head_dim not in hopper.HEAD_DIMS and not shape_reason(spec):
        return f"halves=1 with head_dim={spec.head_dim}: a head in column parts runs whole steps only"
    return hopper.reject(spec, "bwd_dkuv", estimate_smem(spec, c), arch, hopper.SPLIT_HEAD_DIMS)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """64-token steps, a 2-slot q/ds ring, 16-bit coefficients.

    Measured on an H200 (repo-1.3b, T = 16384, bf16; docs/benchmarks/2026-11-29-fast-sigmoid.md):
    4.37 ms, 4.33-4.36 with 3 slots (tuned 4.21), against 6.50 ms for bwd_dkuv's best config."""
    candidates = ({"block_m": bm, "num_stages": stages, "coef_fp32": 0, "halves": 0} for bm in (64, 32)
                  for stages in (2, 3))
    return hopper.default("bwd_dkuv_ws", spec, "bwd_dkuv", reject, arch, candidates, hopper.SPLIT_HEAD_DIMS)


BWD_DKUV_WS = KernelKind(
    name="bwd_dkuv_ws",
    template="bwd_dkuv_ws.py.jinja",
    description="backward dK, dU, dV for Hopper: warp-specialized (gate/grad warp groups + TMA warp), Gluon",
    role=DKUV,
    params=(
        Param("block_m", (32, 64), help="tokens per step"),
        Param("num_stages", (2, 3, 4), log2=False, help="slots of the q/ds ring"),
        Param("coef_fp32", (0, 1), log2=False, help="1: hand the dm/dn coefficients over in fp32 (else 16-bit)"),
        Param("halves", (0, 1), log2=False, help="1: each partition works in two half steps, overlapping its "
              "MMAs with its elementwise work"),
    ),
    reject_fn=reject,
    default_fn=default,
    flops=bwd_dkuv.flops,
    needs=hopper.NEEDS,
    fallback="bwd_dkuv",
)
