"""A tuning session: every (kind, spec, token bucket) of a request, one after another, sharing one
measuring worker, one compile pool, the cache and the Optuna storage, under one time budget."""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from flashmhf.cache.buckets import TUNED_BUCKETS
from flashmhf.cache.device import device_arch, device_info, interpreting
from flashmhf.cache.store import ResultKey, TuningCache
from flashmhf.codegen import Spec, get_kind
from flashmhf.codegen.arch import Arch
from flashmhf.tuner.precompile import CompilePool
from flashmhf.tuner.search import Search, SearchResult, study_name
from flashmhf.tuner.worker import MeasureWorker

DEFAULT_BUCKETS = TUNED_BUCKETS
# Under the CPU interpreter a miniature of the layer is tuned at small token counts.
INTERPRETER_BUCKETS = (1, 16)


def miniature(spec: Spec) -> Spec:
    """A CPU-sized version of ``spec`` (at most 2 heads and 2 sub-networks; head and sub-network
    widths kept, so the same masks and tile constraints are exercised)."""
    h = min(spec.n_heads, 2)
    h_kv = h if spec.n_kv_heads == spec.n_heads else 1
    return Spec(spec.kind, h, h_kv, spec.head_dim, min(spec.n_experts, 2), spec.expert_dim, spec.dtype)


def default_journal(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.stem + ".optuna.journal")


def open_storage(url: str | None, cache_path: Path) -> optuna.storages.BaseStorage:
    """``None``: a journal file next to the cache; ``journal:PATH`` or ``*.journal``: that journal
    file; anything else: an Optuna RDB URL (``sqlite:///…``, ``postgresql://…``)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        path = default_journal(cache_path)
    elif url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
    elif url.endswith(".journal"):
        path = Path(url)
    else:
        try:
            return RDBStorage(url)
        except Exception as exc:  # noqa: BLE001 - report any bad URL in one line
            raise ValueError(f"--storage: cannot open Optuna storage {url!r}: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


@dataclass
class Request:
    specs: list[Spec]
    buckets: tuple[int, ...]
    trials: int
    time_budget_s: float | None
    cache_path: Path
    storage_url: str | None = None
    seed: int | None = None
    shared: bool = False  # several workers on the same studies (tune --gpus / --worker)
    isolate: bool = True  # measure in a child process (crash containment)
    compile_workers: int | None = None  # parallel compile processes (GPU only); 0 disables
    seed_caches: list[Path] | None = None  # files whose results seed the studies (None: the files in effect)


def tunable_jobs(specs: list[Spec], buckets: tuple[int, ...], arch: Arch) -> list[tuple[Spec, int]]:
    """Every (spec, bucket) whose kind has a config for that token count on ``arch`` (fwd_ws, for one,
    leaves small token counts to fwd): the rest have nothing to tune."""
    return [(s, b) for s in specs for b in buckets if next(get_kind(s.kind).space(s, b, arch), None) is not None]


ProgressFn = Callable[[str, int, int, float | None, float | None], None]


class KeyLock:
    """An exclusive lock on one key's tuning, shared by every process that tunes into the same cache
    file: a second `flashmhf tune` of the key waits for the first (then finds it tuned) instead of
    measuring the same configs again. An advisory ``flock`` on a small file next to the cache: the
    operating system releases it when its holder exits, however it exits."""

    def __init__(self, cache_path: Path, name: str) -> None:
        folder = cache_path.with_name(cache_path.name + ".tune-locks")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".lock")
        self._fd: int | None = None

    def acquire(self, wait: bool) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _ordered_with_locks(jobs: list[tuple[Spec, int]], request: Request, device, say: Callable[[str], None]):
    """Yield the jobs, each while this process holds its key's lock: first those no other tuner is
    on, then the others once their tuner is done. Shared studies (--gpus, --worker) divide work by
    claims instead, and take no lock."""
    if request.shared:
        yield from jobs
        return
    later = []
    for spec, bucket in jobs:
        lock = KeyLock(request.cache_path, study_name(ResultKey.for_spec(spec, bucket, device)))
        if lock.acquire(wait=False):
            try:
                yield spec, bucket
            finally:
                lock.release()
        else:
            later.append((spec, bucket, lock))
    for spec, bucket, lock in later:
        say(f"{spec.label()} T={bucket}: another tuner is on it; waiting for it to finish")
        lock.acquire(wait=True)
        try:
            yield spec, bucket
        finally:
            lock.release()


def run(request: Request, progress: ProgressFn | None = None, say: Callable[[str], None] | None = None
        ) -> list[SearchResult]:
    """Tune every (spec, bucket) of ``request``; ``progress(label, done, goal, best_ms, best_tflops)``;
    ``say(line)`` for notes such as waiting for another tuner of the same key (default: stderr)."""
    device, arch = device_info(), device_arch()
    cache = TuningCache(request.cache_path)
    storage = open_storage(request.storage_url, request.cache_path)
    jobs = tunable_jobs(request.specs, request.buckets, arch)
    deadline = time.monotonic() + (request.time_budget_s if request.time_budget_s else math.inf)
    pool = None
    if not interpreting() and request.compile_workers != 0:
        pool = CompilePool(request.compile_workers)
    results: list[SearchResult] = []
    say = say or (lambda line: print(line, file=sys.stderr))
    try:
        with MeasureWorker(isolate=request.isolate) as worker:
            # The worker's and the compile processes' start-up is part of the budget but not of the
            # first key's share: each key gets an equal part of what is left after it (before this, a
            # short budget could leave the first key with only its default measured; with a cold
            # compile pool, with 2-3 configs measured where later keys got 16 or more).
            warming = pool.warm_up() if pool is not None else []
            worker.warm_up()
            cf.wait(warming)
            for i, (spec, bucket) in enumerate(_ordered_with_locks(jobs, request, device, say)):
                # Past the deadline a job still measures its default (Search guarantees one result
                # per key), so a spent budget leaves every key with a result, not just the first ones.
                now = time.monotonic()
                share = max(deadline - now, 0.0) / (len(jobs) - i) if math.isfinite(deadline) else math.inf
                label = f"{spec.label()} T={bucket}"
                flop = get_kind(spec.kind).flops(spec, bucket)

                def report(_, done, goal, best_ms, label=label, flop=flop):
                    if progress:
                        tf = flop / (best_ms * 1e-3) / 1e12 if best_ms else None
                        progress(label, done, goal, best_ms, tf)

                search = Search(
                    spec, bucket, device, cache, storage, worker, trials=request.trials,
                    deadline=now + share, deadline_cap=deadline if math.isfinite(deadline) else None,
                    seed=None if request.seed is None else request.seed + i,
                    shared=request.shared, on_measure=report, compile_pool=pool, seed_caches=request.seed_caches,
                    arch=arch,
                )
                results.append(search.run())
            for spec in request.specs:
                cache.record_source(spec)  # for inspection only; never executed
    finally:
        if pool is not None:
            pool.close()
        cache.close()
    _forget_runtime_choices()
    return results


def _forget_runtime_choices() -> None:
    """New results are in the cache: a runtime in this process must look them up again."""
    import flashmhf_runtime

    flashmhf_runtime.reset()
