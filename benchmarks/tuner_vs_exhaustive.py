"""The tuner against exhaustive search on the GPU: for repo-1.3b forward at T in {64, 16384}, the
exhaustive best over the pruned space against Optuna with a 25% budget, run live through the real
tuner pipeline (fresh cache files, isolated measuring worker, parallel compile), N times with seeds
1..N. Also replays Optuna offline on the exhaustive table (no GPU time) to show the spread over many
seeds. Prints one table; writes tuner_vs_exhaustive.json and the exhaustive caches under $OUT.

    PYTHONUNBUFFERED=1 python -m benchmarks.tuner_vs_exhaustive [--tokens 64,16384] [--live-runs 1,5] [--replays 20]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import argument_parser, out_dir, preset_spec
from flashmhf.cache.store import TuningCache, canonical_config
from flashmhf.codegen import format_config, get_kind
from flashmhf.tuner import session
from flashmhf.tuner.replay import replay_optuna
from flashmhf_runtime import PRESETS


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--preset", default="repo-1.3b", choices=list(PRESETS))
    ap.add_argument("--tokens", default="64,16384")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--resume-dir", type=Path, help="earlier exhaustive-T.sqlite files to continue from")
    ap.add_argument("--live-runs", default="1", help="live Optuna runs (seeds 1..N) per --tokens entry, e.g. 1,5")
    args = ap.parse_args(argv)
    spec = preset_spec("fwd", args.preset)
    kind = get_kind("fwd")
    out = out_dir()  # the exhaustive caches are kept there too (to ship or resume them)
    tmp = Path(tempfile.mkdtemp(prefix="flashmhf-tuner-vs-exhaustive-"))
    rows = []
    token_list = [int(t) for t in args.tokens.split(",")]
    live_runs = [int(n) for n in args.live_runs.split(",")]
    live_runs += [live_runs[-1]] * (len(token_list) - len(live_runs))
    for tokens, n_live in zip(token_list, live_runs):
        space = list(kind.space(spec, tokens))
        budget = max(1, int(len(space) * args.fraction))
        if args.resume_dir and (args.resume_dir / f"exhaustive-{tokens}.sqlite").exists():
            with TuningCache(args.resume_dir / f"exhaustive-{tokens}.sqlite") as old:
                old.copy_to(tmp / f"exhaustive-{tokens}.sqlite")
        t0 = time.monotonic()
        [ex] = session.run(session.Request([spec], (tokens,), trials=len(space), time_budget_s=None,
                                           cache_path=tmp / f"exhaustive-{tokens}.sqlite", seed=0,
                                           storage_url=f"journal:{tmp / f'exhaustive-{tokens}.journal'}"))
        t_ex = time.monotonic() - t0
        with TuningCache(tmp / f"exhaustive-{tokens}.sqlite") as cache:
            measured = cache.measured_configs(ex.key)
            cache.copy_to(out / f"exhaustive-{tokens}.sqlite")  # single file, no WAL: shippable
        table = {c: t.median_ms for c, t in measured.items() if t.ok}
        statuses = {}
        for t in measured.values():
            statuses[t.status] = statuses.get(t.status, 0) + 1
        best_ex = ex.best.median_ms
        live = []
        for seed in range(1, n_live + 1):
            t0 = time.monotonic()
            [op] = session.run(session.Request([spec], (tokens,), trials=budget, time_budget_s=None,
                                               cache_path=tmp / f"optuna-{tokens}-{seed}.sqlite", seed=seed))
            # Against the exhaustive best: the first live trial whose config times within 3% of it in
            # the exhaustive table (one set of measurements, so no run-to-run noise in the comparison).
            to_ex = next((i for i, (cfg, _) in enumerate(op.history, 1)
                          if table.get(canonical_config(cfg), float("inf")) <= 1.03 * best_ex), None)
            live.append({
                "seed": seed, "measured": len(op.history), "best_ms_live": op.best.median_ms, "best": op.best.config,
                "best_ms_in_exhaustive_table": table.get(canonical_config(op.best.config), float("nan")),
                "trials_to_3pct_of_exhaustive": to_ex, "wall_s": time.monotonic() - t0,
            })
        replay = replay_optuna(kind, spec, tokens, table, budget=budget, seeds=args.replays) if args.replays else None
        row = {
            "tokens": tokens, "space": len(space), "statuses": statuses, "budget": budget,
            "exhaustive_best_ms": best_ex, "exhaustive_best": ex.best.config, "exhaustive_wall_s": t_ex,
            "default_ms": ex.default_ms, "within_3pct_of_best": sum(v <= 1.03 * best_ex for v in table.values()),
            "live": live, "replay": replay, "table": table,
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "table"}, default=str), flush=True)
    (out / "tuner_vs_exhaustive.json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n| T | pruned space (within 3% of best) | exhaustive best ms (config) | default ms | Optuna budget "
          "| live runs: trials to ≤3% of the exhaustive best (best found, in the exhaustive table) "
          "| replays: median trials to ≤3% (max), runs within budget |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rp = r["replay"] or {"median_trials_to_3pct": "—", "max_trials_to_3pct": "—",
                             "within_3pct_at_budget": "—", "runs": 0}
        live = "; ".join(f"{x['trials_to_3pct_of_exhaustive'] or 'not in budget'} "
                         f"({x['best_ms_in_exhaustive_table']:.4f})" for x in r["live"])
        print(f"| {r['tokens']} | {r['space']} ({r['within_3pct_of_best']}) | {r['exhaustive_best_ms']:.4f} "
              f"({format_config(r['exhaustive_best'])}) | {r['default_ms']:.4f} | {r['budget']} | {live} | "
              f"{rp['median_trials_to_3pct']} ({rp['max_trials_to_3pct']}), "
              f"{rp['within_3pct_at_budget']}/{rp['runs']} |")
    print(f"wall: exhaustive {[round(r['exhaustive_wall_s']) for r in rows]} s, "
          f"live Optuna {[[round(x['wall_s']) for x in r['live']] for r in rows]} s")


if __name__ == "__main__":
    main()
