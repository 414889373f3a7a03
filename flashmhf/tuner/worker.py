"""A measuring subprocess that survives candidates which crash the CUDA context or hang.

The parent sends (spec, tokens, seed, config); the child keeps the current problem's inputs and
reference between candidates, measures, and answers with a Measurement. If the child dies or
exceeds the timeout it is killed, the candidate is recorded as a crash, and a new child starts.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing.connection import Connection

from flashmhf.codegen import Config, Spec
from flashmhf.tuner.measure import Measurement


def _child(conn: Connection, env: dict[str, str]) -> None:
    os.environ.update(env)
    from flashmhf.cache.device import interpreting
    from flashmhf.tuner.harness import make_problem
    from flashmhf.tuner.measure import measure

    interpreter = interpreting()
    device = "cpu" if interpreter else "cuda"
    _initialise_device(interpreter)  # every child, restarted ones too: before anything prints mid-run
    current = None
    problem = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        if msg == WARM_UP:
            conn.send(WARM_UP)
            continue
        spec, tokens, seed, config = msg
        if current != (spec, tokens, seed):
            problem = None  # free the previous inputs first
            problem = make_problem(spec, tokens, device, seed)
            current = (spec, tokens, seed)
        result = measure(problem, config, interpreter=interpreter)
        conn.send(result)
        if result.status == "crash":
            return  # the CUDA context may be unusable: let the parent start a fresh child


WARM_UP = "warm-up"


def _initialise_device(interpreter: bool) -> None:
    """The one-time costs of a fresh process: torch and the measuring code imported, CUDA initialised
    with its context current and a cuBLAS handle made (else the first reference matmul warns
    "Attempting to run cuBLAS, but there was no current CUDA context" in the middle of the progress)."""
    import torch

    if not interpreter:
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.current_blas_handle()
        torch.cuda.synchronize()


class MeasureWorker:
    """Measures candidates in a child process (``isolate=True``) or in this process."""

    def __init__(self, env: dict[str, str] | None = None, timeout_s: float = 300.0, isolate: bool = True):
        self.env = dict(env or {})
        self.timeout_s = timeout_s
        self.isolate = isolate
        self._proc: mp.Process | None = None
        self._conn: Connection | None = None
        self._local = None
        self.restarts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, self.env), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        self._proc, self._conn = None, None

    def measure(self, spec: Spec, tokens: int, seed: int, config: Config) -> Measurement:
        if not self.isolate:
            return self._measure_here(spec, tokens, seed, config)
        result, error = self._ask((spec, tokens, seed, config))
        if error is None and result.status != "crash":
            return result
        self._stop()  # a crashed, hung or dead child: the next request starts a fresh one
        self.restarts += 1
        return result if error is None else Measurement("crash", error=error)

    def warm_up(self) -> None:
        """Start the child and let it pay its one-time costs (process start, imports, CUDA context)
        now, so they are not charged to the first candidate's time. A child that does not answer is
        stopped; the next ``measure`` starts a fresh one."""
        if not self.isolate:
            return
        reply, error = self._ask(WARM_UP)
        if error is not None or reply != WARM_UP:
            self._stop()

    def _ask(self, msg) -> tuple[object, str | None]:
        """Send ``msg`` to the child (started if need be) and wait for its reply: (reply, None), or
        (None, why) when it does not answer within ``timeout_s`` or has died."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        assert self._conn is not None
        try:
            self._conn.send(msg)
            if self._conn.poll(self.timeout_s):
                return self._conn.recv(), None
            return None, f"timeout: no answer within {self.timeout_s:.0f} s"
        except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
            code = self._proc.exitcode if self._proc else "?"
            return None, f"worker process died ({type(exc).__name__}, exit code {code})"

    def _measure_here(self, spec: Spec, tokens: int, seed: int, config: Config) -> Measurement:
        from flashmhf.cache.device import interpreting
        from flashmhf.tuner.harness import make_problem
        from flashmhf.tuner.measure import measure

        key = (spec, tokens, seed)
        if self._local is None or self._local[0] != key:
            self._local = (key, make_problem(spec, tokens, "cpu" if interpreting() else "cuda", seed))
        return measure(self._local[1], config, interpreter=interpreting())

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self._stop()

    def __enter__(self) -> MeasureWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
