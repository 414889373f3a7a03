"""Produce the tuned cache shipped for the H200 (package data): repo-1.3b and paper-1.3b, bf16,
forward at every default token bucket, fwd_ws and the backward kinds at training sizes, under a time budget;
optionally merged with exhaustive results. Writes a single-file cache and prints the bests.

    PYTHONUNBUFFERED=1 python3 gpu/ship_h200.py --out h200.sqlite [--merge exhaustive-64.sqlite ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("FLASHMHF_KERNEL_DIR", "/tmp/flashmhf-kernels")

from flashmhf.cache.store import TuningCache  # noqa: E402
from flashmhf.codegen import KINDS, Spec, format_config, template_hash  # noqa: E402
from flashmhf.tuner import session  # noqa: E402
from flashmhf_runtime import PRESETS  # noqa: E402


def specs(kind: str) -> list[Spec]:
    out = []
    for name in ("repo-1.3b", "paper-1.3b"):
        p = PRESETS[name]
        out.append(Spec(kind, p.n_heads, p.kv_heads, p.head_dim, p.n_experts, p.expert_dim, "bf16"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--merge", type=Path, nargs="*", default=[])
    ap.add_argument("--seed-from", type=Path, help="an earlier cache whose bests (any template) seed the search")
    ap.add_argument("--fwd-budget", type=float, default=110)
    ap.add_argument("--bwd-budget", type=float, default=50)
    ap.add_argument("--trials", type=int, default=16, help="forward trials per key")
    ap.add_argument("--bwd-trials", type=int, help="backward trials per key (default: --trials)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp()) / "h200.sqlite"
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
            print(f"{key.kind:8s} H{key.n_heads} E{key.n_experts}x{key.expert_dim} T={key.bucket:6d} "
                  f"{best.median_ms:.4f} ms  {format_config(best.config)}  ({len(cache.trials(key))} trials)")
        current = {key.template_hash for key, _ in cache.best_rows()
                   if key.template_hash == template_hash(key.kind)}
        cache.copy_to(args.out, template_hash=sorted(current))  # ship only results for these templates
    print(f"tuning wall time: forward {t_fwd:.0f} s, total {t_all:.0f} s")


if __name__ == "__main__":
    main()
