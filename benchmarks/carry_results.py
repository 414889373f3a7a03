"""Merge tuned cache files and carry their results to the installed templates where the kernels did
not change (flashmhf/tuner/carry.py), writing one single-file cache (a rollback journal, the form
shipped inside the package). Run without TRITON_INTERPRET; needs no GPU.

    python -m benchmarks.carry_results flashmhf/cache/shipped/nvidia-h200.sqlite [MORE.sqlite ...] \\
        --out new.sqlite [--kind fwd_ws,bwd_dq_ws,bwd_dkuv_ws]

Results of another template whose kernels differ are reported and left out of the output: they need
re-tuning (``flashmhf tune``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import argument_parser
from flashmhf.cache.store import TuningCache
from flashmhf.codegen import KINDS, template_hash
from flashmhf.tuner.carry import carry


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("caches", type=Path, nargs="+", help="cache files to merge (the first one's trials first)")
    ap.add_argument("--out", type=Path, required=True, help="the single-file cache to write (must not exist)")
    ap.add_argument("--kind", default=",".join(KINDS), help="comma list of kinds to carry (default: all)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("carry_results compiles nothing but needs real Triton kernels: unset TRITON_INTERPRET")
    if args.out.exists():
        sys.exit(f"--out {args.out}: already exists")
    kinds = [k for k in args.kind.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        sys.exit(f"--kind: unknown {', '.join(unknown)} (kinds: {', '.join(KINDS)})")
    work = Path(tempfile.mkdtemp(prefix="flashmhf-carry-")) / "merged.sqlite"
    with TuningCache(work) as cache:
        for path in args.caches:
            added, skipped = cache.merge_from(path)
            print(f"{path.name}: {added} trials merged" + (f", {len(skipped)} skipped" if skipped else ""))
        reports = carry(cache, kinds)
        for report in reports:
            print(report.line())
        current = sorted({template_hash(k) for k in KINDS})
        written = cache.copy_to(args.out, template_hash=current)
    stale = sum(r.trials for r in reports if not r.carried)
    print(f"{args.out}: {written} trials on the installed templates "
          f"({sum(r.trials for r in reports if r.carried)} carried; {stale} left out, tuned on other kernels)")


if __name__ == "__main__":
    main()
