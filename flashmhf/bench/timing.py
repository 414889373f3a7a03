"""Timing helpers: medians of triton.testing.do_bench (L2 flushed), or CUDA-graph replay; and the
CUDA allocator peak of one call."""

from __future__ import annotations

from collections.abc import Callable

# The core's forward at T <= this (launch-bound) is timed as a CUDA-graph replay, FlashMHF and SwiGLU.
GRAPH_TOKENS = 64


def median_ms(fn: Callable[[], object], *, graph: bool = False, warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn`` in ms. ``graph=True`` replays a CUDA graph (for launch-bound small T)."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def paired_median_ms(first: Callable[[], object], second: Callable[[], object], *, graph: bool = False,
                     rounds: int = 3, rep: int = 100) -> tuple[float, float]:
    """``median_ms`` of two callables measured in alternation, ``rounds`` times each, and the median
    of each one's rounds. A GPU host's Python speed drifts within a run, and a host-bound eager call
    follows it: side-by-side ratios hold up better when both sides are measured in the same minute,
    several times over."""
    import statistics

    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        times[0].append(median_ms(first, graph=graph, rep=rep))
        times[1].append(median_ms(second, graph=graph, rep=rep))
    return statistics.median(times[0]), statistics.median(times[1])


def host_ms(fn: Callable[[], object], calls: int = 30) -> float:
    """Median host time of one call of ``fn`` in ms: the GPU is idle before each call and the call is
    not waited for, so this is what the Python side costs (launches are queued, not run)."""
    import statistics
    import time

    import torch

    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12


def ffn_flop(tokens: int, swiglu_weights: int, backward: bool) -> float:
    """The work every bench row is rated by: a SwiGLU FFN of the same d_ff, whose three weight
    matrices hold ``swiglu_weights`` = 3 * d_model * d_ff values (2 FLOPs per weight and token;
    a training step 3x the forward). FlashMHF and SwiGLU rows share it, so TFLOP/s compare times."""
    return 2.0 * tokens * swiglu_weights * (3 if backward else 1)


def peak_mib(fn: Callable[[], object]) -> float:
    """CUDA allocator peak above what was allocated before, during one call of ``fn`` (MiB)."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
