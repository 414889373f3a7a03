"""Timing helpers: medians of triton.testing.do_bench (L2 flushed), or CUDA-graph replay."""

from __future__ import annotations

from collections.abc import Callable


def median_ms(fn: Callable[[], object], *, graph: bool = False, warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn`` in ms. ``graph=True`` replays a CUDA graph (for launch-bound small T)."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def quantiles_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) in ms, L2 flushed between runs."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(p50), float(p20), float(p80)


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12
