"""Python host time of the layer's eager decode call, on a CPU (no GPU needed).

Runs a small FlashMHF layer once under Triton's interpreter (which fills the layer op's fast path),
then swaps the two kernel launches of that path for no-ops and times ``layer(x)`` at T = 1 without
grad: what is left is the host work around the kernels (module lookups, checks, allocations, the two
projections), the part of a decode call that Python costs. (The stubs skip the launchers themselves,
with their own allocations: the one-kernel forward's workspace and counters.) The two projections alone are timed
beside it. Minimum over rounds of the mean of many calls: the least-disturbed figure on a shared
machine. Absolute times differ on a GPU host; differences between versions of the code carry over.

    TRITON_INTERPRET=1 python -m benchmarks.layer_host_cpu [--rounds 7]
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

import flashmhf_runtime as fm
from benchmarks.common import argument_parser
from flashmhf_runtime import layer_op


def _us_per_call(fn, calls: int = 5000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _stub_launches() -> int:
    """Replace the launchers of the layer op's fast path by no-ops (the one-kernel forward's, or the
    norm/router's and the core's); how many token counts were stubbed."""
    count = 0
    for per_tokens in layer_op._fast_forward.values():
        for n_tokens, (prologue, _core, direct) in per_tokens.items():
            per_tokens[n_tokens] = (None if prologue is None else (lambda *a: None), lambda *a: None, direct)
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (the minimum is reported)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1: the layer's fast path is filled by one interpreted call")
    torch.manual_seed(0)
    layer = fm.FlashMHF(64, 2, 128, 2, head_norm=True, dtype=torch.float32)
    x = torch.randn(1, 64)
    w_in, w_out = layer.w_in.weight, layer.w_out.weight
    with torch.no_grad():
        layer(x)
        if not _stub_launches():
            sys.exit("the layer op's fast path was not filled: nothing to time")
        rows = {
            "layer(x), launches stubbed": lambda: layer(x),
            "the two projections alone": lambda: F.linear(F.linear(x, w_in), w_out),
        }
        best = {name: min(_us_per_call(fn) for _ in range(args.rounds)) for name, fn in rows.items()}
    for name, us in best.items():
        print(f"{name:32s} {us:7.2f} µs")
    around = best["layer(x), launches stubbed"] - best["the two projections alone"]
    print(f"{'host work around the kernels':32s} {around:7.2f} µs")


if __name__ == "__main__":
    main()
