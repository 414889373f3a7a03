"""Replay the search offline against a table of measured times (no GPU): how many distinct configs
does it measure before finding one within 3% of the exhaustive best? Used to evaluate the search
strategy over many seeds from one exhaustive GPU run."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import optuna

from flashmhf.cache.device import DeviceInfo
from flashmhf.cache.store import TuningCache, canonical_config
from flashmhf.codegen import Config, KernelKind, Spec
from flashmhf.tuner.measure import Measurement
from flashmhf.tuner.search import Search

REPLAY_DEVICE = DeviceInfo("replay-table", "0.0", "replay", "replay")


class TableWorker:
    """Answers measurements from a table: configs missing from it failed to compile."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def measure(self, spec: Spec, tokens: int, seed: int, config: Config) -> Measurement:
        ms = self.table.get(canonical_config(config))
        if ms is None:
            return Measurement("compile-error", error="not in the measured table")
        return Measurement("ok", ms, ms, ms, rel_err=0.0, timing="replay")


def replay_optuna(kind: KernelKind, spec: Spec, tokens: int, table: dict[str, float], *, budget: int,
                  seeds: int = 20, batch: int = 8) -> dict:
    """Run the search ``seeds`` times against ``table``; summarise trials-to-within-3%."""
    best = min(table.values())
    needed, at_budget = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            cache = TuningCache(Path(tmp) / f"replay-{seed}.sqlite")
            search = Search(spec, tokens, REPLAY_DEVICE, cache, optuna.storages.InMemoryStorage(),
                            TableWorker(table), trials=len(table) * 4, deadline=float("inf"), seed=seed,
                            brute_force_up_to=0, batch=batch)
            search.trials = budget
            search.run()
            order = [ms for _, ms in search.order]
            hit = next((i for i, ms in enumerate(order, 1) if ms is not None and ms <= best * 1.03), None)
            # Past the budget, keep going until found, to report how many it would need.
            if hit is None:
                search.trials = len(search.space)
                search.run()
                order = [ms for _, ms in search.order]
                hit = next((i for i, ms in enumerate(order, 1) if ms is not None and ms <= best * 1.03), None)
            needed.append(hit if hit is not None else len(search.space))
            at_budget += hit is not None and hit <= budget
            cache.close()
    return {
        "runs": seeds, "budget": budget, "space": len(table), "median_trials_to_3pct": statistics.median(needed),
        "max_trials_to_3pct": max(needed), "within_3pct_at_budget": at_budget, "trials_to_3pct": needed,
    }
