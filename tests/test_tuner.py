"""The tuner end to end under the interpreter: pruning, encoding, search, cache writes, resume, crashes."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from flashmhf.cache.device import device_info  # noqa: E402
from flashmhf.cache.store import ResultKey, TuningCache  # noqa: E402
from flashmhf.codegen import Spec, get_kind  # noqa: E402
from flashmhf.tuner import session  # noqa: E402
from flashmhf.tuner.search import from_params, to_params  # noqa: E402
from flashmhf.tuner.worker import MeasureWorker  # noqa: E402

TINY = Spec("fwd", 2, 1, 32, 2, 32, "fp32")  # H_kv < H, tiny enough for the interpreter


def test_space_is_pruned_before_compiling():
    kind = get_kind("fwd")
    spec = Spec("fwd", 16, 16, 128, 22, 256, "bf16")
    space = list(kind.space(spec, 16384))
    assert 0 < len(space) < kind.space_size()
    assert all(kind.reject(spec, c, 16384) is None for c in space)
    # Each rule bites: tile straddling sub-networks, too much shared memory, rows that are not there.
    base = dict(block_m=128, block_f=64, num_warps=8, num_stages=3, split=1, tma=0)
    assert "does not divide" in kind.reject(Spec("fwd", 2, 2, 128, 2, 48, "bf16"), {**base, "block_f": 32}, None)
    assert "shared memory" in kind.reject(spec, {**base, "block_f": 256, "num_stages": 5}, None)
    assert "larger than the" in kind.reject(spec, {**base, "block_m": 64}, 1)
    assert "registers" in kind.reject(spec, {**base, "block_m": 256, "num_warps": 4, "num_stages": 1}, None)
    # Descriptors are built per call, on the host: only where host time is small next to the kernel.
    assert "tma=1 below" in kind.reject(spec, {**base, "block_m": 16, "split": 16, "tma": 1}, 64)
    assert kind.reject(spec, {**base, "tma": 1}, 16384) is None
    assert any(c["tma"] for c in space) and not any(c["tma"] for c in kind.space(spec, 64))


def test_ordinal_encoding_round_trip():
    kind = get_kind("fwd")
    for config in list(kind.space(TINY, 16))[:20]:
        params = to_params(kind, config)
        assert params is not None and from_params(kind, params) == config
    assert to_params(kind, {**next(kind.space(TINY, 16)), "block_m": 24}) is None


def _request(tmp_path: Path, trials: int, **kw) -> session.Request:
    return session.Request(specs=[TINY], buckets=(16,), trials=trials, time_budget_s=None,
                           cache_path=tmp_path / "c.sqlite", seed=1, **kw)


def test_tune_end_to_end_writes_checked_results(tmp_path):
    [result] = session.run(_request(tmp_path, trials=5, isolate=False))
    assert result.measured_total == 5 and result.measured_now == 5
    assert result.best is not None and result.best.status == "ok"
    with TuningCache(tmp_path / "c.sqlite") as cache:
        trials = cache.trials(result.key)
        assert len(trials) == 5
        ok = [t for t in trials if t.ok]
        assert result.best.median_ms == min(t.median_ms for t in ok)
        assert result.key.device == "triton-interpreter-cpu"
        assert cache.kernel_source(TINY) is not None  # stored for inspection
    # The default config is always among the measured (it is the first seed).
    assert result.default_ms is not None
    assert result.trials_to_within_3pct is not None and 1 <= result.trials_to_within_3pct <= 5


def test_interrupted_study_resumes_without_remeasuring(tmp_path):
    session.run(_request(tmp_path, trials=3, isolate=False))
    [again] = session.run(_request(tmp_path, trials=6, isolate=False))
    assert again.measured_total == 6 and again.measured_now == 3
    with TuningCache(tmp_path / "c.sqlite") as cache:
        trials = cache.trials(again.key)
    configs = [t.canonical_config() for t in trials]
    assert len(configs) == 6 == len(set(configs))  # nothing measured twice


def test_wrong_results_are_recorded_and_never_best(tmp_path, monkeypatch):
    from flashmhf.tuner import harness

    real_run = harness.Problem.run

    def broken_for_small_tiles(self, config):
        out = real_run(self, config)
        if config["block_f"] == 16:
            for t in self.outputs:
                t.mul_(1.5)  # a plausible-looking but wrong result
        return out

    monkeypatch.setattr(harness.Problem, "run", broken_for_small_tiles)
    [result] = session.run(_request(tmp_path, trials=8, isolate=False))
    with TuningCache(tmp_path / "c.sqlite") as cache:
        trials = cache.trials(result.key)
    wrong = [t for t in trials if t.status == "wrong-result"]
    assert wrong and all(t.config["block_f"] == 16 for t in wrong)
    assert result.best.config["block_f"] != 16


def test_worker_survives_a_hung_or_killed_child():
    spec, config = TINY, get_kind("fwd").default(TINY, 16)
    with MeasureWorker(timeout_s=0.01) as worker:  # the child cannot even start in time
        m = worker.measure(spec, 16, 0, config)
        assert m.status == "crash" and "timeout" in m.error
    with MeasureWorker(timeout_s=120) as worker:
        assert worker.measure(spec, 16, 0, config).status == "ok"
        child = worker._proc
        child.kill()
        child.join()
        m = worker.measure(spec, 16, 0, config)  # the dead child is noticed and replaced
        assert m.status in ("ok", "crash")
        assert worker.measure(spec, 16, 0, config).status == "ok"
        assert worker._proc is not child


def test_warm_up_starts_the_child_that_then_measures():
    spec, config = TINY, get_kind("fwd").default(TINY, 16)
    with MeasureWorker(timeout_s=120) as worker:
        worker.warm_up()
        child = worker._proc
        assert child is not None and child.is_alive()
        assert worker.measure(spec, 16, 0, config).status == "ok"
        assert worker._proc is child and worker.restarts == 0  # the warmed child measured
    with MeasureWorker(timeout_s=0.01) as worker:  # no answer in time: stopped, replaced on demand
        worker.warm_up()
        assert worker._proc is None


def test_compile_pool_warm_up_starts_every_process_before_the_first_job():
    """A tuning run warms its compile processes beside the measuring worker, so the first key's share
    of the budget is not spent starting them (it measured 2-3 configs where later keys got 16+)."""
    import os

    from flashmhf.tuner.precompile import CompilePool

    config = get_kind("fwd").default(TINY, 16)
    with CompilePool(workers=2, device="cpu") as pool:
        pids = [f.result(timeout=300) for f in pool.warm_up()]
        assert all(isinstance(p, int) and p != os.getpid() for p in pids)
        assert len(pool._pool._processes) == 2  # both started by the warm-up, none left to start later
        assert pool.submit([(TINY, config, 16)])[0].result(timeout=300) is None  # and they compile


def test_sigkilled_tune_leaves_a_valid_cache_and_resumes(tmp_path):
    cache_path = tmp_path / "c.sqlite"
    cmd = [sys.executable, "-m", "flashmhf.cli", "tune", "--d-model", "64", "--heads", "2", "--kv-heads", "1",
           "--d-ff", "64", "--experts", "2", "--dtype", "fp32", "--kind", "fwd", "--tokens", "16",
           "--trials", "40", "--cache", str(cache_path), "--seed", "3", "--no-isolate"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = ResultKey.for_spec(TINY, 16, device_info())
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if cache_path.exists():
            with TuningCache(cache_path, readonly=True) as cache:
                n = len(cache.trials(key))
            if n >= 3:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert n >= 3, "the tuner did not record trials before the kill"
    with TuningCache(cache_path) as cache:
        assert cache.verify() == []
        before = len(cache.trials(key))
    [result] = session.run(session.Request(specs=[TINY], buckets=(16,), trials=before + 2, time_budget_s=None,
                                           cache_path=cache_path, seed=4, isolate=False))
    assert result.measured_total == before + 2 and result.measured_now == 2


@pytest.mark.parametrize("kind", ["bwd_dq", "bwd_dkuv"])
def test_backward_kinds_are_tuned_with_a_gradient_check(tmp_path, kind):
    spec = Spec(kind, 2, 1, 32, 2, 32, "fp32")
    [result] = session.run(session.Request([spec], (16,), trials=3, time_budget_s=None,
                                           cache_path=tmp_path / "c.sqlite", seed=2, isolate=False))
    assert result.measured_total == 3 and result.best is not None and result.best.status == "ok"


def test_every_kernel_kind_has_a_tuning_harness():
    from flashmhf.codegen import KINDS
    from flashmhf.tuner.harness import BUILDERS

    assert {k.role.name for k in KINDS.values()} <= set(BUILDERS)


def test_a_spent_time_budget_still_measures_each_keys_default_and_the_nearest_keys_best(tmp_path):
    """Startup (worker, compiles) can use a whole key's share of --time-budget: every bucket still
    gets its default measured instead of no result at all (the H200 ship run lost repo-1.3b T=1 so),
    and the nearest other key's best beside it (what a short budget over many keys would skip)."""
    from flashmhf.cache.store import canonical_config

    kind = get_kind("fwd")
    other = next(c for c in kind.space(TINY, 1) if c != kind.default(TINY, 1) and c in list(kind.space(TINY, 16)))
    seeds = tmp_path / "seeds.sqlite"
    with TuningCache(seeds) as cache:  # this shape in fp16: the nearest key there is for every bucket
        for bucket in (1, 16):
            k = ResultKey.for_spec(dataclasses.replace(TINY, dtype="fp16"), bucket, device_info())
            cache.record_trial(k, other, "ok", median_ms=1e-3)
    results = session.run(session.Request(specs=[TINY], buckets=(1, 16), trials=5, time_budget_s=1e-3,
                                          cache_path=tmp_path / "c.sqlite", seed=1, isolate=False,
                                          seed_caches=[seeds]))
    assert [r.key.bucket for r in results] == [1, 16]
    with TuningCache(tmp_path / "c.sqlite") as cache:
        for bucket in (1, 16):
            [key] = [k for k in cache.keys() if k.bucket == bucket]
            measured = [t.canonical_config() for t in cache.trials(key)]
            assert measured == [canonical_config(kind.default(TINY, bucket)), canonical_config(other)], bucket


def test_a_param_added_later_fills_in_for_older_configs():
    kind = get_kind("fwd")
    old = dict(block_m=16, block_f=16, num_warps=4, num_stages=1, split=2)  # written before `tma` existed
    assert kind.complete(old) == {**old, "tma": 0}
    assert kind.complete({**old, "tma": 1})["tma"] == 1
    # Params without an `absent` value are not guessed: the config stays incomplete (and is rejected).
    assert "block_m" not in kind.complete({"tma": 0})


def test_best_config_of_an_older_template_seeds_the_next_study(tmp_path):
    import dataclasses

    from flashmhf.cache.store import canonical_config

    [first] = session.run(_request(tmp_path, trials=1, isolate=False))  # measures the default only
    default = first.best.config
    kind = get_kind("fwd")
    # An older template's best for the same key, recorded before the `tma` param existed.
    old_best = next(c for c in kind.space(TINY, 16) if c != default and not c["tma"])
    old_key = dataclasses.replace(first.key, template_hash="0123456789abcdef")
    with TuningCache(tmp_path / "c.sqlite") as cache:
        cache.record_trial(old_key, {n: v for n, v in old_best.items() if n != "tma"}, "ok", median_ms=1e-3)
    [again] = session.run(_request(tmp_path, trials=2, isolate=False))
    with TuningCache(tmp_path / "c.sqlite") as cache:
        measured = [t.canonical_config() for t in cache.trials(again.key)]
    assert measured == [canonical_config(default), canonical_config(old_best)]  # measured right after the default


def test_measurements_from_an_older_space_give_this_key_its_best(tmp_path):
    import dataclasses

    [first] = session.run(_request(tmp_path, trials=3, isolate=False))
    # The same measurements, as if made before the kind's space changed (another space hash only).
    old_key = dataclasses.replace(first.key, space_hash="0" * 16)
    with TuningCache(tmp_path / "c.sqlite") as cache:
        for t in cache.trials(first.key):
            cache.record_trial(old_key, t.config, t.status, median_ms=t.median_ms)
        cache.delete(**first.key.to_dict())
        assert cache.best(first.key) is None
    [again] = session.run(_request(tmp_path, trials=3, isolate=False))
    assert again.measured_now == 0  # every config reused, none measured again
    assert again.best is not None and again.best.median_ms == first.best.median_ms
    with TuningCache(tmp_path / "c.sqlite", readonly=True) as cache:
        assert cache.best(first.key).median_ms == first.best.median_ms  # what the runtime reads
        assert len(cache.trials(first.key)) == 3


def _tune_cmd(cache_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flashmhf.cli", "tune", "--d-model", "64", "--heads", "2", "--kv-heads", "1",
            "--d-ff", "64", "--experts", "2", "--dtype", "fp32", "--kind", "fwd", "--cache", str(cache_path),
            "--no-isolate", *extra]


def test_concurrent_tuners_of_one_key_measure_each_config_once(tmp_path):
    cache_path = tmp_path / "c.sqlite"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = _tune_cmd(cache_path, "--tokens", "16", "--trials", "4")
    procs = [subprocess.Popen([*cmd, "--seed", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    with TuningCache(cache_path, readonly=True) as cache:
        trials = cache.trials(ResultKey.for_spec(TINY, 16, device_info()))
    configs = [t.canonical_config() for t in trials]
    assert len(configs) == len(set(configs)) == 4, configs  # 3 tuners, a 4-config goal: 4 measurements
    assert sum("already tuned (4 results), nothing to do" in out for out in outputs) == 2, outputs


def test_problems_launch_through_the_runtimes_bound_launcher(monkeypatch):
    """A tuned time is what the runtime pays: the harness launches each config through
    ``dispatch.bind`` (replayed arguments, the stream's scratch), bound once per config."""
    from flashmhf.tuner.harness import make_problem
    from flashmhf_runtime import dispatch

    bound, calls = [], []

    def bind(spec, config):
        bound.append((spec.kind, dict(config)))
        return lambda *args: calls.append(args)

    monkeypatch.setattr(dispatch, "bind", bind)
    problem = make_problem(Spec("fwd", 2, 2, 32, 2, 32, "fp32"), 4, "cpu", seed=0, with_reference=False)
    config = get_kind("fwd").default(problem.spec, 4)
    for _ in range(3):
        problem.run(config)
    problem.run({**config, "num_warps": 8})
    assert bound == [("fwd", config), ("fwd", {**config, "num_warps": 8})]
    assert len(calls) == 4 and all(args == problem.args for args in calls)
