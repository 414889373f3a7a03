"""Seeding from other keys' results and the walk over neighbouring configs, on tables of times (no
kernels run: the search is replayed offline, as `python -m flashmhf.tuner.replay` does)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flashmhf.cache.portable import export_json

pytest.importorskip("optuna")

from flashmhf.cache.device import DeviceInfo  # noqa: E402
from flashmhf.cache.store import ResultKey, TuningCache, canonical_config  # noqa: E402
from flashmhf.codegen import Spec, get_kind  # noqa: E402
from flashmhf.tuner import replay as rp  # noqa: E402
from flashmhf.tuner.seeds import Space, neighbours, ranked_configs, transfer_seeds  # noqa: E402

KIND = get_kind("fwd")
SPEC = Spec("fwd", 16, 16, 128, 22, 256, "bf16")  # repo-1.3b
OTHER = Spec("fwd", 16, 16, 128, 15, 384, "bf16")  # paper-1.3b: same head width
H200 = DeviceInfo("nvidia-h200", "9.0", "3.6.0", "2.11.0")


def _cfg(block_m, block_f, num_warps, num_stages, split=1, tma=0) -> dict:
    return dict(block_m=block_m, block_f=block_f, num_warps=num_warps, num_stages=num_stages, split=split, tma=tma)


def _needle_table(tokens: int = 16384) -> rp.Table:
    """A space whose best is two steps from the default, next to a slow neighbour of the default
    (the shape measured at T = 16384): everything else is much slower."""
    configs = [c for c in KIND.space(SPEC, tokens) if not c["tma"]]
    default = {**KIND.default(SPEC, tokens), "tma": 0}
    runner_up = {**default, "block_f": 32}
    needle = {**runner_up, "num_stages": default["num_stages"] - 1}
    times = {canonical_config(c): 3.0 + 0.01 * i for i, c in enumerate(configs)}
    times.update({canonical_config(default): 1.05, canonical_config(runner_up): 1.25, canonical_config(needle): 1.0})
    return rp.Table("needle", SPEC, tokens, "nvidia-h200", times, configs)


def test_the_walk_reaches_a_needle_next_to_the_runner_up_within_a_tenth_of_the_space():
    table = _needle_table()
    result = rp.replay(table, runs=3, fraction=0.10)
    assert result["configs_within"] == 1
    assert result["hits"] == 3, result
    assert result["worst_gap"] == 0.0


def test_ranked_configs_are_nearest_key_first_each_fastest_first_and_leave_out_the_key(tmp_path):
    key = ResultKey.for_spec(SPEC, 16384, H200)
    with TuningCache(tmp_path / "c.sqlite") as cache:
        for bucket, spec, configs in [
            (16384, SPEC, [_cfg(64, 64, 4, 2)]),  # the key itself: never a seed
            (4096, SPEC, [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2), _cfg(128, 32, 8, 3)]),
            (64, SPEC, [_cfg(64, 64, 4, 4, split=8)]),
            (16384, OTHER, [_cfg(128, 32, 4, 3)]),
        ]:
            k = ResultKey.for_spec(spec, bucket, H200)
            for i, c in enumerate(configs):
                cache.record_trial(k, c, "ok", median_ms=1.0 + i)
        cache.record_trial(ResultKey.for_spec(SPEC, 1024, H200), _cfg(16, 16, 4, 1), "crash", error="x")
        ranked = ranked_configs([cache], key)
        # The other shape at 16384 (its penalty: 1), T = 4096 (2 doublings away), then T = 64 (8).
        assert ranked == [[_cfg(128, 32, 4, 3)], [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2), _cfg(128, 32, 8, 3)],
                          [_cfg(64, 64, 4, 4, split=8)]]
        space = Space(KIND, KIND.space(SPEC, 16384))
        seeds = transfer_seeds([cache], key, space, limit=4)
    # Every key's best before any runner-up; split=8 is outside the space at T = 16384 and more than
    # MAX_PROJECTION_STEPS from any config in it, so T = 64's best is dropped.
    assert seeds == [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2), _cfg(128, 32, 8, 3)]


def test_the_same_shape_in_the_other_16_bit_dtype_seeds_before_another_shape(tmp_path):
    key = ResultKey.for_spec(dataclasses.replace(SPEC, dtype="fp16"), 16384, H200)
    with TuningCache(tmp_path / "c.sqlite") as cache:
        for spec, config in [
            (SPEC, _cfg(128, 64, 8, 3)),  # bf16, the same shape: same element size, same MMA
            (dataclasses.replace(OTHER, dtype="fp16"), _cfg(128, 32, 4, 3)),  # fp16, another shape
            (dataclasses.replace(SPEC, dtype="fp32"), _cfg(64, 32, 4, 2)),  # fp32: another element size
        ]:
            cache.record_trial(ResultKey.for_spec(spec, 16384, H200), config, "ok", median_ms=1.0)
        ranked = ranked_configs([cache], key)
    assert ranked == [[_cfg(128, 64, 8, 3)], [_cfg(128, 32, 4, 3)], [_cfg(64, 32, 4, 2)]]


def test_projection_moves_a_config_outside_the_space_to_its_nearest_neighbour():
    space = Space(KIND, KIND.space(SPEC, 64))
    # tma=1 is rejected below 1024 tokens: the same tiles through pointers instead.
    assert space.project(_cfg(64, 64, 4, 3, split=8, tma=1)) == _cfg(64, 64, 4, 3, split=8, tma=0)
    old = {k: v for k, v in _cfg(64, 64, 4, 3, split=8).items() if k != "tma"}  # written before `tma`
    assert space.project(old) == _cfg(64, 64, 4, 3, split=8)
    assert space.project({**old, "block_m": 24}) is None  # not a declared value
    assert len(neighbours(KIND, _cfg(64, 64, 4, 3))) == 2 + 2 + 1 + 2 + 1 + 1


def test_a_seed_cache_measures_another_shapes_best_right_after_the_default(tmp_path):
    table = _needle_table()
    needle = min(table.times, key=table.times.get)
    seed_file = tmp_path / "seeds.sqlite"
    with TuningCache(seed_file) as cache:  # paper-1.3b's best at this token count is the needle
        cache.record_trial(ResultKey.for_spec(OTHER, 16384, H200), json.loads(needle), "ok", median_ms=0.9)
    result = rp.replay(table, runs=1, seed_caches=[seed_file], leave_out="key")
    assert result["trials_to_hit"] == [2]
    # Leaving out repo-1.3b's shape keeps paper-1.3b's rows; leaving out paper-1.3b's key drops them.
    other = dataclasses.replace(table, spec=OTHER)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    [kept] = rp.without_table([seed_file], table, "spec", tmp_path / "a")
    [gone] = rp.without_table([seed_file], other, "key", tmp_path / "b")
    with TuningCache(kept, readonly=True) as a, TuningCache(gone, readonly=True) as b:
        assert len(a.find_trials()) == 1 and b.find_trials() == []


def test_tables_load_from_a_cache_export_and_from_the_gpu_scripts_json(tmp_path, capsys):
    table = _needle_table()
    rows = [{"tokens": 16384, "spec": SPEC.to_dict(), "device": "nvidia-h200", "table": table.times}]
    script_json = tmp_path / "tuner_vs_exhaustive.json"
    script_json.write_text(json.dumps(rows))
    [loaded] = rp.load_tables(script_json)
    assert loaded.spec == SPEC and loaded.tokens == 16384 and loaded.times == table.times
    with TuningCache(tmp_path / "ex.sqlite") as cache:
        key = ResultKey.for_spec(SPEC, 64, H200)
        cache.record_trial(key, {k: v for k, v in _cfg(64, 64, 4, 3, split=8).items() if k != "tma"}, "ok",
                           median_ms=0.03)
        cache.record_trial(key, _cfg(64, 32, 4, 3, split=8), "ok", median_ms=0.04)
        cache.record_trial(key, _cfg(64, 16, 4, 3, split=8), "compile-error", error="x")
        export_json(cache, tmp_path / "export.json")
    [exported] = rp.load_tables(tmp_path / "export.json")
    assert exported.tokens == 64 and len(exported.configs) == 2
    assert canonical_config(_cfg(64, 64, 4, 3, split=8)) in exported.times  # completed with tma=0
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        rp.load_tables(tmp_path / "bad.json")
    assert rp.main([str(script_json), "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "| tuner_vs_exhaustive.json T=16384 | " in out and "**2/2**" in out


class _RecordingPool:
    """A compile pool that compiles nothing: records what was submitted, in order; of all the jobs
    submitted, the first ``finish`` (None: all) finish (after ``delay_s`` seconds, on a thread), the
    others never start."""

    def __init__(self, finish: int | None = None, delay_s: float = 0.0) -> None:
        self.finish, self.delay_s = finish, delay_s
        self.submitted: list[str] = []
        self.futures: list = []

    def submit(self, jobs):
        import concurrent.futures as cf
        import threading

        out = []
        for _spec, config, _tokens in jobs:
            self.submitted.append(canonical_config(config))
            future = cf.Future()
            if self.finish is None or len(self.futures) + len(out) < self.finish:
                future.set_running_or_notify_cancel()
                if self.delay_s:
                    threading.Timer(self.delay_s, future.set_result, (None,)).start()
                else:
                    future.set_result(None)
            out.append(future)
        self.futures += out
        return out


def test_sure_seeds_compile_first_and_a_spent_share_cancels_the_rest(tmp_path):
    import optuna

    from flashmhf.tuner.search import Search

    table = _needle_table()
    needle = json.loads(min(table.times, key=table.times.get))
    seed_file = tmp_path / "seeds.sqlite"
    with TuningCache(seed_file) as cache:  # fp16 of this shape: the nearest key, its best the needle
        cache.record_trial(ResultKey.for_spec(dataclasses.replace(SPEC, dtype="fp16"), 16384, H200), needle, "ok",
                           median_ms=0.9)
        for i, config in enumerate(table.configs[:6]):  # more seeds than the sure ones, from another shape
            cache.record_trial(ResultKey.for_spec(OTHER, 16384, H200), config, "ok", median_ms=1.0 + i)
    pool = _RecordingPool(finish=2)  # the first two jobs finish at once, the rest never

    class Worker(rp.TableWorker):
        def measure(self, *args):  # the sure seeds' compiles must be done before anything is measured
            assert all(f.done() for f in pool.futures[:2]), "measured before the sure seeds compiled"
            return super().measure(*args)

    with TuningCache(tmp_path / "c.sqlite") as cache:
        search = Search(SPEC, 16384, H200, cache, optuna.storages.InMemoryStorage(), Worker(table.times),
                        trials=12, deadline=0.0, seed=0, brute_force_up_to=0, batch=8, seed_caches=[seed_file],
                        space=table.configs, compile_pool=pool)
        search.run()
        measured = [c for c, _ in search.order]
    default = canonical_config({**KIND.default(SPEC, 16384), "tma": 0})
    # The share was spent before it began: the default and the nearest key's best only, compiled first.
    assert measured == [default, canonical_config(needle)]
    assert pool.submitted[:2] == [default, canonical_config(needle)] and len(pool.submitted) > 2
    assert all(f.cancelled() for f in pool.futures[2:])  # never started, and not waited for


@pytest.mark.parametrize("cap_s,more", [(None, False), (30.0, True), (0.6, False)],
                         ids=["no-cap", "cap-far", "cap-near"])
def test_waiting_for_compiles_moves_a_keys_deadline_up_to_the_runs(tmp_path, cap_s, more):
    """At the start of a run a key's configs compile for seconds a round (later keys load them from
    Triton's cache), so a key's share counts measuring only: its compile waits move its deadline, up
    to the run's deadline (``deadline_cap``). The first key then measures as the others do, not its
    sure seeds only (2-4 configs on the H200 where the next keys measured 12-26)."""
    import time

    import optuna

    from flashmhf.tuner.search import Search

    table = _needle_table()
    pool = _RecordingPool(delay_s=0.3)
    now = time.monotonic()
    with TuningCache(tmp_path / "c.sqlite") as cache:
        search = Search(SPEC, 16384, H200, cache, optuna.storages.InMemoryStorage(), rp.TableWorker(table.times),
                        trials=12, deadline=now + 0.2, seed=0, brute_force_up_to=0, batch=4, seed_caches=[],
                        space=table.configs, compile_pool=pool, deadline_cap=None if cap_s is None else now + cap_s)
        search.run()
    assert (len(search.order) == 12) == more, len(search.order)
    if cap_s is not None:
        assert time.monotonic() - now < cap_s + 1.0  # never far past the run's deadline


def test_with_a_compile_pool_and_time_left_the_search_measures_its_whole_budget(tmp_path):
    import optuna

    from flashmhf.tuner.search import Search

    table = _needle_table()
    pool = _RecordingPool()
    with TuningCache(tmp_path / "c.sqlite") as cache:
        search = Search(SPEC, 16384, H200, cache, optuna.storages.InMemoryStorage(), rp.TableWorker(table.times),
                        trials=12, deadline=float("inf"), seed=0, brute_force_up_to=0, batch=8, seed_caches=[],
                        space=table.configs, compile_pool=pool)
        search.run()
    assert len(search.order) == 12
    assert set(pool.submitted) >= {c for c, _ in search.order[1:]}  # all but maybe a single-config round
