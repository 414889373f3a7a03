"""Produce the tuned cache shipped for the H200 (package data): repo-1.3b and paper-1.3b, bf16,
forward at every default token bucket, fwd_ws and the backward kinds at training sizes, under a time
budget; optionally merged with exhaustive results. Writes a single-file cache and prints the bests.

    PYTHONUNBUFFERED=1 python -m benchmarks.ship_h200 --out h200.sqlite [--merge exhaustive-64.sqlite ...]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import argument_parser, preset_spec
from flashmhf.cache.store import TuningCache
from flashmhf.codegen import KINDS, Spec, format_config, template_hash
from flashmhf.tuner import session


def specs(kind: str) -> list[Spec]:
    return [preset_spec(kind, name) for name in ("repo-1.3b", "paper-1.3b")]


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--out", type=Path, required=True, help="the single-file cache to write")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="cache files whose trials are merged in")
    ap.add_argument("--seed-from", type=Path, help="an earlier cache whose bests (any template) seed the search")
    ap.add_argument("--fwd-budget", type=float, default=110, help="seconds for the forward keys")
    ap.add_argument("--bwd-budget", type=float, default=50, help="seconds for fwd_ws and the backward keys")
    ap.add_argument("--trials", type=int, default=16, help="forward trials per key")
    ap.add_argument("--bwd-trials", type=int, help="backward trials per key (default: --trials)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="flashmhf-ship-")) / "h200.sqlite"
    if args.seed_from:
        with TuningCache(tmp) as cache:
            print(f"seeds: {cache.merge_from(args.seed_from)[0]} earlier trials from {args.seed_from.name}")
    t0 = time.monotonic()
    session.run(session.Request(specs("fwd"), session.DEFAULT_BUCKETS, trials=args.trials,
                                time_budget_s=args.fwd_budget, cache_path=tmp, seed=0))
    t_fwd = time.monotonic() - t0
    session.run(session.Request(specs("fwd_ws") + specs("bwd_dq") + specs("bwd_dq_ws") + specs("bwd_dkuv")
                                + specs("bwd_dkuv_ws"), (4096, 16384),
                                trials=args.bwd_trials or args.trials,
                                time_budget_s=args.bwd_budget, cache_path=tmp, seed=0))
    t_all = time.monotonic() - t0
    with TuningCache(tmp) as cache:
        for extra in args.merge:
            if extra.exists():
                print(f"merged {cache.merge_from(extra)[0]} trials from {extra.name}")
        for key, best in cache.best_rows(template_hash=[template_hash(k) for k in KINDS]):
            s = key.spec
            print(f"{s.kind:8s} H{s.n_heads} E{s.n_experts}x{s.expert_dim} T={key.bucket:6d} "
                  f"{best.median_ms:.4f} ms  {format_config(best.config)}  ({len(cache.trials(key))} trials)")
        current = {key.template_hash for key, _ in cache.best_rows()
                   if key.template_hash == template_hash(key.spec.kind)}
        cache.copy_to(args.out, template_hash=sorted(current))  # ship only results for these templates
    print(f"tuning wall time: forward {t_fwd:.0f} s, total {t_all:.0f} s")


if __name__ == "__main__":
    main()
