"""Tuner at the needle, on the GPU: for one preset's forward at T in {64, 1024, 16384}, the exhaustive
best over the pruned space, then N live tuning runs (seeds 1..N), each one `flashmhf tune`-style run
over all the token counts (fresh cache file, so the buckets seed each other; seeded also from the
shipped caches without this preset's rows, as a new preset would be), through the real pipeline
(parallel compile, isolated measuring worker). A live run passes at a token count when one of its
first 10 % of measurements is a config that times within 2 % of the best *in the exhaustive table*
(one set of measurements: no run-to-run noise in the comparison). Also replays the search offline on
the fresh tables (20 seeds, cold). Prints one table; JSON (tables included, readable by
`python -m flashmhf.tuner.replay`) under $OUT.

    PYTHONUNBUFFERED=1 python -m benchmarks.tuner_vs_exhaustive [--preset repo-1.3b] [--tokens 64,1024,16384]
        [--live-runs 5] [--replays 20] [--resume-dir DIR]

A call cut by a time limit: run it again with --resume-dir pointing at the exhaustive-T.sqlite files
it left under $OUT (measured configs are not measured again).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import argument_parser, out_dir, preset_spec
from flashmhf.cache.paths import shipped_cache_paths
from flashmhf.cache.store import TuningCache, canonical_config
from flashmhf.codegen import format_config, get_kind
from flashmhf.tuner import session
from flashmhf.tuner.replay import load_tables, markdown, replay, without_table
from flashmhf_runtime import PRESETS


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--preset", default="repo-1.3b", choices=list(PRESETS))
    ap.add_argument("--kind", default="fwd")
    ap.add_argument("--tokens", default="64,1024,16384")
    ap.add_argument("--fraction", type=float, default=0.10, help="live budget: this fraction of the space")
    ap.add_argument("--within", type=float, default=0.02, help="target: this close to the exhaustive best")
    ap.add_argument("--live-runs", type=int, default=5)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--resume-dir", type=Path, help="earlier exhaustive-T.sqlite files to continue from")
    args = ap.parse_args(argv)
    spec = preset_spec(args.kind, args.preset)
    kind = get_kind(args.kind)
    out = out_dir()
    tmp = Path(tempfile.mkdtemp(prefix="tune-exp-"))
    token_list = [int(t) for t in args.tokens.split(",")]
    rows = []
    for tokens in token_list:
        space = list(kind.space(spec, tokens))
        if args.resume_dir and (args.resume_dir / f"exhaustive-{tokens}.sqlite").exists():
            with TuningCache(args.resume_dir / f"exhaustive-{tokens}.sqlite") as old:
                old.copy_to(tmp / f"exhaustive-{tokens}.sqlite")
        t0 = time.monotonic()
        [ex] = session.run(session.Request([spec], (tokens,), trials=len(space), time_budget_s=None,
                                           cache_path=tmp / f"exhaustive-{tokens}.sqlite", seed=0, seed_caches=[],
                                           storage_url=f"journal:{tmp / f'exhaustive-{tokens}.journal'}"))
        with TuningCache(tmp / f"exhaustive-{tokens}.sqlite") as cache:
            measured = cache.measured_configs(ex.key)
            cache.copy_to(out / f"exhaustive-{tokens}.sqlite")  # single file: resumable, shippable
        table = {c: t.median_ms for c, t in measured.items() if t.ok}
        target = (1 + args.within) * ex.best.median_ms
        rows.append({
            "tokens": tokens, "spec": spec.to_dict(), "device": ex.key.device, "space": len(space),
            "budget": max(1, int(len(space) * args.fraction)), "exhaustive_best_ms": ex.best.median_ms,
            "exhaustive_best": ex.best.config, "exhaustive_wall_s": time.monotonic() - t0,
            "default_ms": ex.default_ms, "within": sum(v <= target for v in table.values()),
            "live": [], "table": table,
        })
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "table"}, default=str), flush=True)
    (out / "tuner_vs_exhaustive.json").write_text(json.dumps(rows, indent=1, default=str))
    by_tokens = {r["tokens"]: r for r in rows}
    tables = load_tables(out / "tuner_vs_exhaustive.json")
    seeds = without_table(shipped_cache_paths(), tables[0], "spec", tmp)  # other presets' results only
    for seed in range(1, args.live_runs + 1):
        t0 = time.monotonic()
        # One budget for the run (the largest); each token count is judged on its own first 10 %.
        results = session.run(session.Request([spec], tuple(token_list), trials=max(r["budget"] for r in rows),
                                              time_budget_s=None, cache_path=tmp / f"live-{seed}.sqlite", seed=seed,
                                              seed_caches=seeds))
        for res in results:
            r = by_tokens[res.key.bucket]
            budget_history = res.history[: r["budget"]]
            hit = next((i for i, (cfg, _) in enumerate(budget_history, 1)
                        if r["table"].get(canonical_config(cfg), float("inf"))
                        <= (1 + args.within) * r["exhaustive_best_ms"]), None)
            found = min((r["table"].get(canonical_config(cfg), float("inf")) for cfg, _ in budget_history),
                        default=float("inf"))
            r["live"].append({"seed": seed, "trials_to_within": hit, "best_in_budget_vs_exhaustive": found /
                              r["exhaustive_best_ms"] - 1, "run_wall_s": time.monotonic() - t0})
    replays = [replay(t, runs=args.replays, fraction=args.fraction, within=args.within) for t in tables]
    (out / "tuner_vs_exhaustive.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "replay.json").write_text(json.dumps(replays, indent=1))
    print(f"\n{args.preset} {args.kind} bf16: live runs, budget {args.fraction:.0%} of the space, target within "
          f"{args.within:.0%} of the exhaustive best\n")
    print("| T | space (within target) | exhaustive best (config) | default | budget | live runs: trials to target "
          "(best in budget) | live runs within target |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        live = "; ".join(f"{x['trials_to_within'] or 'missed'} (+{x['best_in_budget_vs_exhaustive'] * 100:.1f} %)"
                         for x in r["live"])
        passed = sum(x["trials_to_within"] is not None for x in r["live"])
        print(f"| {r['tokens']} | {r['space']} ({r['within']}) | {r['exhaustive_best_ms']:.4f} ms "
              f"({format_config(r['exhaustive_best'])}) | {r['default_ms']:.4f} ms | {r['budget']} | {live} | "
              f"**{passed}/{len(r['live'])}** |")
    print(f"\nOffline replays on these tables (cold start, {args.replays} seeds):\n")
    print(markdown(replays))
    print(f"\nwall: exhaustive {[round(r['exhaustive_wall_s']) for r in rows]} s, "
          f"live runs {[round(x['run_wall_s']) for x in rows[0]['live']]} s")


if __name__ == "__main__":
    main()
