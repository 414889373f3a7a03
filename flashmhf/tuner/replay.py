"""Replay the search offline against tables of measured times (no GPU): over many seeds, how often
does it measure a config within ``within`` (2 %) of a table's best inside ``fraction`` (10 %) of the
space? Tables come from exhaustive GPU runs; the search, seeding included, is the one `flashmhf
tune` runs, with the table as its space and its times as the measurements.

    python -m flashmhf.tuner.replay TABLE.json [TABLE.json …] [--seed-cache FILE …] [--leave-out key]

TABLE.json: a `flashmhf cache export` of exhaustive runs (one table per key), or the JSON of
``python -m benchmarks.tuner_vs_exhaustive`` (one table per token count). ``--seed-cache`` gives cache files whose
results seed the study as the user's and shipped caches do in a real run (none: a cold start); the
table's own key (``--leave-out key``, the default) or its whole shape (``spec``) is taken out of
them first, so that a study is not handed its answer.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna

from flashmhf.cache.device import DeviceInfo
from flashmhf.cache.store import TuningCache, canonical_config
from flashmhf.codegen import Config, Spec, get_kind
from flashmhf.tuner.measure import Measurement
from flashmhf.tuner.search import Search
from flashmhf.tuner.seeds import ordinal

CACHE_EXPORT_FORMAT = "flashmhf-tuning-cache"
# What the tables of benchmarks/tuner_vs_exhaustive.py measured when their rows did not yet name it.
LEGACY_TABLE_SPEC = Spec("fwd", 16, 16, 128, 22, 256, "bf16")  # repo-1.3b forward
LEGACY_TABLE_DEVICE = "nvidia-h200"
LEAVE_OUT = ("key", "spec", "none")


@dataclass
class Table:
    """Median times (ms) of every config that ran, for one kind, shape and token count."""

    name: str
    spec: Spec
    tokens: int
    device: str
    times: dict[str, float]  # canonical config (params added later filled in) -> ms
    configs: list[Config]

    @property
    def best_ms(self) -> float:
        return min(self.times.values())

    def within(self, frac: float) -> int:
        """How many configs time within ``frac`` of the best."""
        return sum(ms <= self.best_ms * (1 + frac) for ms in self.times.values())

    def budget(self, fraction: float) -> int:
        return max(1, int(len(self.configs) * fraction))


def _table(name: str, spec: Spec, tokens: int, device: str, timed: Sequence[tuple[dict, float]]) -> Table:
    kind = get_kind(spec.kind)
    times: dict[str, float] = {}
    configs: list[Config] = []
    for config, ms in timed:
        config = kind.complete(config)
        if ordinal(kind, config) is None:
            raise ValueError(f"{name}: config {config} is not in the declared space of kind {spec.kind!r}")
        c = canonical_config(config)
        if c not in times:
            configs.append(config)
        times[c] = min(ms, times.get(c, ms))
    if not times:
        raise ValueError(f"{name}: no measured config")
    return Table(name, spec, tokens, device, times, configs)


def load_tables(path: str | Path) -> list[Table]:
    """The tables in one JSON file (see the module doc for the two formats)."""
    path = Path(path)
    data = json.loads(path.read_text())
    tables = []
    if isinstance(data, dict) and data.get("format") == CACHE_EXPORT_FORMAT:
        for result in data["results"]:
            k = result["key"]
            spec = Spec(k["kind"], k["n_heads"], k["n_kv_heads"], k["head_dim"], k["n_experts"], k["expert_dim"],
                        k["dtype"])
            timed = [(t["config"], t["median_ms"]) for t in result["trials"] if t["status"] == "ok"]
            tables.append(_table(f"{path.name} T={k['bucket']}", spec, k["bucket"], k["device"], timed))
    elif isinstance(data, list) and all(isinstance(r, dict) and "table" in r and "tokens" in r for r in data):
        for row in data:
            spec = Spec(**row["spec"]) if "spec" in row else LEGACY_TABLE_SPEC
            timed = [(json.loads(c), ms) for c, ms in row["table"].items()]
            tables.append(_table(f"{path.name} T={row['tokens']}", spec, row["tokens"],
                                 row.get("device", LEGACY_TABLE_DEVICE), timed))
    else:
        raise ValueError(f"{path}: neither a `flashmhf cache export` nor a tuner_vs_exhaustive.py JSON")
    return tables


class TableWorker:
    """Answers measurements from a table: configs missing from it failed to compile. ``noise``: each
    answer is the table's time times (1 + a normal draw of that standard deviation), as a live
    measurement differs from the exhaustive run's."""

    def __init__(self, table: dict[str, float], noise: float = 0.0, seed: int = 0) -> None:
        self.table = table
        self.noise = noise
        self.rng = random.Random(seed)

    def measure(self, spec: Spec, tokens: int, seed: int, config: Config) -> Measurement:
        ms = self.table.get(canonical_config(config))
        if ms is None:
            return Measurement("compile-error", error="not in the measured table")
        ms *= max(0.5, 1 + self.rng.gauss(0.0, self.noise)) if self.noise else 1.0
        return Measurement("ok", ms, ms, ms, rel_err=0.0, timing="replay")


def without_table(caches: Sequence[Path], table: Table, leave_out: str, folder: Path) -> list[Path]:
    """Copies of ``caches`` in ``folder`` without the table's key (``key``: its shape at its token
    count, any template) or shape (``spec``: every token count); ``none`` keeps everything."""
    if leave_out not in LEAVE_OUT:
        raise ValueError(f"leave_out must be one of {', '.join(LEAVE_OUT)}, got {leave_out!r}")
    drop = {**table.spec.to_dict(), "device": table.device}
    if leave_out == "key":
        drop["bucket"] = table.tokens
    out = []
    for i, path in enumerate(caches):
        dest = folder / f"seed-{i}-{Path(path).name}"
        with TuningCache(path, readonly=True) as source:
            source.copy_to(dest)
        if leave_out != "none":
            with TuningCache(dest) as copy:
                copy.delete(**drop)
        out.append(dest)
    return out


def replay(table: Table, *, runs: int = 20, fraction: float = 0.10, within: float = 0.02, batch: int = 8,
           seed_caches: Sequence[Path] = (), leave_out: str = "key", noise: float = 0.0) -> dict:
    """Run the search ``runs`` times (seeds 0..runs-1) with a budget of ``fraction`` of the table's
    configs; per run, the measurements until one within ``within`` of the best (None: not in budget)
    and the best config found, both judged by the table's times (as a live run's would be)."""
    budget = table.budget(fraction)
    device = DeviceInfo(table.device, "9.0", "3.6.0", "replay")
    hits: list[int | None] = []
    gaps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        seeds_from = without_table(seed_caches, table, leave_out, Path(tmp))
        for run in range(runs):
            with TuningCache(Path(tmp) / f"replay-{run}.sqlite") as cache:
                search = Search(table.spec, table.tokens, device, cache, optuna.storages.InMemoryStorage(),
                                TableWorker(table.times, noise, seed=run), trials=budget, deadline=float("inf"),
                                seed=run, brute_force_up_to=0, batch=batch, seed_caches=seeds_from,
                                space=table.configs)
                search.run()
            # Judged by the table, not by the (noisy) answers the search saw.
            times = [table.times[c] if ms is not None else None for c, ms in search.order[:budget]]
            ok = [ms for ms in times if ms is not None]
            hits.append(next((i for i, ms in enumerate(times, 1)
                              if ms is not None and ms <= table.best_ms * (1 + within)), None))
            gaps.append(min(ok) / table.best_ms - 1 if ok else float("inf"))
    found = [h for h in hits if h is not None]
    return {
        "table": table.name, "tokens": table.tokens, "space": len(table.configs), "budget": budget,
        "within": within, "noise": noise, "configs_within": table.within(within), "runs": runs, "hits": len(found),
        "median_trials_to_hit": statistics.median(found) if found else None,
        "max_trials_to_hit": max(found) if found else None, "worst_gap": max(gaps), "trials_to_hit": hits,
    }


def markdown(results: Sequence[dict]) -> str:
    """One Markdown table of :func:`replay` results."""
    lines = ["| table | space | budget | configs within | runs within in budget | median (max) trials | "
             "worst run's best |", "|---|---|---|---|---|---|---|"]
    for r in results:
        pct = f"{r['within'] * 100:g} %"
        trials = f"{r['median_trials_to_hit']} ({r['max_trials_to_hit']})" if r["hits"] else "—"
        lines.append(f"| {r['table']} | {r['space']} | {r['budget']} | {r['configs_within']} ({pct}) | "
                     f"**{r['hits']}/{r['runs']}** | {trials} | +{r['worst_gap'] * 100:.1f} % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmhf.tuner.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("tables", nargs="+", type=Path, help="JSON files of measured tables")
    ap.add_argument("--seed-cache", action="append", type=Path, default=[],
                    help="a cache file whose results seed the studies (repeatable; none: cold start)")
    ap.add_argument("--leave-out", choices=LEAVE_OUT, default="key",
                    help="what of the table's own results to take out of the seed caches")
    ap.add_argument("--runs", type=int, default=20, help="seeds per table")
    ap.add_argument("--fraction", type=float, default=0.10, help="budget as a fraction of the space")
    ap.add_argument("--within", type=float, default=0.02, help="target: this close to the table's best")
    ap.add_argument("--batch", type=int, default=8, help="configs per round (8: the compile pool's)")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="relative standard deviation of each answer (e.g. 0.02), as between live runs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    for name in ("runs", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.fraction <= 1 or not args.within >= 0 or not args.noise >= 0:
        ap.error("--fraction must be in (0, 1], --within and --noise at least 0")
    try:
        tables = [t for path in args.tables for t in load_tables(path)]
    except (OSError, ValueError, KeyError) as exc:
        ap.error(f"cannot read the tables: {exc}")
    results = []
    for table in tables:
        results.append(replay(table, runs=args.runs, fraction=args.fraction, within=args.within,
                              batch=args.batch, seed_caches=args.seed_cache, leave_out=args.leave_out,
                              noise=args.noise))
        print(f"{table.name}: {results[-1]['hits']}/{args.runs}", file=sys.stderr, flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
