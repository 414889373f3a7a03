"""Compile many (spec, config) pairs in parallel worker processes, filling Triton's on-disk cache.

Compilation is CPU-bound and single-threaded per kernel; timing must be serial on the GPU. Compiling
every candidate first in a process pool turns the timing pass's compiles into disk-cache hits.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Iterable

from flashmhf.codegen import Config, Spec


def _example_tokens(tokens: int) -> int:
    # Triton specialises integer arguments on ==1 and on divisibility by 16: keep that class.
    if tokens == 1:
        return 1
    return 32 if tokens % 16 == 0 else 33


def _compile_one(spec: Spec, config: Config, tokens: int, device: str = "cuda") -> str | None:
    """Run the kernel once on small inputs of the same specialisation class; return an error or None."""
    import torch

    from flashmhf.tuner.harness import make_problem

    try:
        make_problem(spec, _example_tokens(tokens), device, seed=0, with_reference=False).run(config)
        if device == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - reported to the caller as a failed compile
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _warm(device: str) -> int:
    """Load what every compile needs (torch, Triton, the code generator; a CUDA context): the part of a
    compile process's first job that does not depend on the job. Returns the process id."""
    import torch

    import flashmhf.tuner.harness  # noqa: F401 - imports the code generator and the kinds

    if device == "cuda":
        torch.cuda.init()
    return os.getpid()


def precompile(
    jobs: Iterable[tuple[Spec, Config, int]], workers: int | None = None, device: str = "cuda"
) -> list[str | None]:
    """Compile each (spec, config, tokens) job; returns the error text (or None) per job, in order."""
    jobs = list(jobs)
    workers = workers or max(1, min(len(jobs), (os.cpu_count() or 2) - 1, 16))
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_one(*job, device=device) for job in jobs]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, *zip(*jobs), [device] * len(jobs)))


class CompilePool:
    """A persistent pool of compile processes (each pays for its CUDA context once per session)."""

    def __init__(self, workers: int | None = None, device: str = "cuda") -> None:
        self.workers = workers or max(1, min((os.cpu_count() or 2) - 1, 12))
        self.device = device
        self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))

    def warm_up(self) -> list[cf.Future]:
        """Start the processes and load the compiler in them now (seconds each), not during the first
        compile jobs: a tuning run does this beside its measuring worker's start-up, so the first
        key's share of the time budget is not spent on it. One job per process: ``wait`` on them."""
        return [self._pool.submit(_warm, self.device) for _ in range(self.workers)]

    def submit(self, jobs: list[tuple[Spec, Config, int]]) -> list[cf.Future]:
        """Start compiling the jobs, in this order, without waiting: one future each, whose result is
        the error text or None (errors are returned, not raised: the measure step records them)."""
        return [self._pool.submit(_compile_one, spec, config, tokens, self.device) for spec, config, tokens in jobs]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> CompilePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
