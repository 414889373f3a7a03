"""Time a list of configs of one kernel kind side by side on the GPU: compiled in parallel, each
checked against the float64 reference (outputs poisoned) and then timed (median of do_bench, L2
flushed). Prints one table with ms and TF/s of the executed GEMMs; writes
sweep-<kind>-<preset>-T<tokens>.json under $OUT.

    PYTHONUNBUFFERED=1 python -m benchmarks.sweep_kind --kind bwd_dkuv --tokens 16384 \\
        --config '{"block_f": 64, ...}' --config '...' [--preset repo-1.3b]
"""

from __future__ import annotations

import functools
import json

import torch

from benchmarks.common import argument_parser, out_dir, preset_spec
from flashmhf.bench.timing import median_ms, tflops
from flashmhf.codegen import KINDS, Spec, format_config, get_kind
from flashmhf.tuner.harness import make_problem
from flashmhf.tuner.precompile import precompile
from flashmhf_runtime import PRESETS


def executed_flop(kind, spec: Spec, tokens: int, config: dict) -> float:
    """FLOPs a launch executes: the kind's count, plus the second m, n recompute of a split bwd_dkuv
    (8 GEMM-sized products instead of 6)."""
    return kind.flops(spec, tokens) * (8 / 6 if config.get("split_dv") else 1)


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--kind", required=True, choices=list(KINDS))
    ap.add_argument("--preset", default="repo-1.3b", choices=list(PRESETS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--config", action="append", default=[], help="JSON config (repeat); default: the kind's default")
    args = ap.parse_args(argv)
    spec = preset_spec(args.kind, args.preset)
    kind = get_kind(args.kind)
    configs = [json.loads(c) for c in args.config] or [kind.default(spec, args.tokens)]
    errors = precompile([(spec, c, args.tokens) for c in configs])
    problem = make_problem(spec, args.tokens, "cuda", seed=0)
    rows = []
    print(f"{args.kind} {args.preset} T={args.tokens} bf16 on {torch.cuda.get_device_name()}")
    print("| config | rel err | ms | TF/s executed |\n|---|---|---|---|")
    for config, err in zip(configs, errors):
        row = {"config": config, "compile_error": err}
        if err is None:
            try:
                row["rel_err"] = problem.check(config)
                row["ms"] = median_ms(functools.partial(problem.run, config), rep=200)
                row["tflops"] = tflops(executed_flop(kind, spec, args.tokens, config), row["ms"])
            except Exception as exc:  # noqa: BLE001 - a failing config is a row of the table
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        if "ms" in row:
            print(f"| {format_config(config)} | {row['rel_err']:.2e} | {row['ms']:.3f} | {row['tflops']:.0f} |",
                  flush=True)
        else:
            print(f"| {format_config(config)} | {row.get('error') or (err or '').splitlines()[0][:80]} | | |",
                  flush=True)
    (out_dir() / f"sweep-{args.kind}-{args.preset}-T{args.tokens}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
