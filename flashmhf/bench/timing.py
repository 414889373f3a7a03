"""Timing helpers: medians of triton.testing.do_bench (L2 flushed), or CUDA-graph replay."""

from __future__ import annotations

from collections.abc import Callable


def median_ms(fn: Callable[[], object], *, graph: bool = False, warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn`` in ms. ``graph=True`` replays a CUDA graph (for launch-bound small T)."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12
