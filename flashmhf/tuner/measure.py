"""Measure one candidate: compile, check against the reference, then time it.

Runs inside a worker process (see worker.py) so that a candidate that kills the CUDA context is
recorded as a crash instead of taking the tuner down.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from flashmhf.codegen import Config
from flashmhf.tuner.harness import Problem

# Token counts up to this are launch-bound: time CUDA-graph replays instead of single launches.
GRAPH_TOKENS = 64


@dataclass
class Measurement:
    status: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    rel_err: float | None = None
    error: str | None = None
    timing: str = ""  # "do_bench", "cudagraph" or "interpreter-wall" (not a GPU timing)

    def to_dict(self) -> dict:
        return asdict(self)


def classify(exc: BaseException) -> str:
    """Map a compile/launch exception to a trial status."""
    name = type(exc).__name__
    text = str(exc)
    if name == "OutOfResources" or "out of resource" in text.lower():
        return "out-of-resources"
    if name in ("CompilationError", "PTXASError", "CompileTimeAssertionFailure", "UnsupportedLanguageConstruct"):
        return "compile-error"
    if "PassManager" in text or "pipeline failed" in text.lower() or "NVGPUWarpSpecialization" in text:
        return "compile-error"  # compiler pass crashes (seen with warp specialisation on Triton 3.6)
    return "crash"


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _time_wall(fn, reps: int = 5) -> tuple[float, float, float]:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5]


def _time_gpu(fn, graph: bool) -> tuple[float, float, float]:
    import triton.testing

    # 40 ms of repetitions per candidate: a stable median for ranking at a third of the default cost.
    q = [0.5, 0.2, 0.8]
    if graph:
        return tuple(float(x) for x in triton.testing.do_bench_cudagraph(fn, rep=40, quantiles=q))
    return tuple(float(x) for x in triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=q))


def measure(problem: Problem, config: Config, *, interpreter: bool) -> Measurement:
    """Compile and check ``config`` on ``problem`` (gate), then time it."""
    try:
        err = problem.check(config)
    except Exception as exc:  # noqa: BLE001 - every failure is a recorded trial status
        return Measurement(classify(exc), error=_first_line(exc))
    if not err <= problem.tolerance:  # also catches NaN (unwritten poison)
        return Measurement("wrong-result", rel_err=err, error=f"rel. error {err:.3g} > {problem.tolerance:g}")
    fn = lambda: problem.run(config)  # noqa: E731
    try:
        if interpreter:
            med, p20, p80 = _time_wall(fn)
            timing = "interpreter-wall"
        else:
            graph = problem.tokens <= GRAPH_TOKENS
            med, p20, p80 = _time_gpu(fn, graph)
            timing = "cudagraph" if graph else "do_bench"
    except Exception as exc:  # noqa: BLE001
        return Measurement(classify(exc), rel_err=err, error=_first_line(exc))
    return Measurement("ok", med, p20, p80, rel_err=err, timing=timing)
