"""GPU check of fwd_ws at d_h = 96 (issue 16): the head as column parts of 64 + 32 on an H100/H200.

1. Accuracy: fwd_ws for repo-128m (H = 8, d_h = 96, E = 8, d_e = 256, bf16) against float64 with a
   poisoned output, at T = 1, 100, 1024, 4096, 16384 (default config) and every config of its space
   at one T; H_kv = 2 (4 heads per kv head); and the op (`flash_mhf`) choosing fwd_ws at 4096 tokens.
   Fails (exit 1) above a relative error of 1e-2.
2. Time at T = 1024, 4096, 16384: fwd_ws (each config of its space), the plain fwd kind (its default
   and the best of a small grid) and cuBLAS SwiGLU of the same d_model and d_ff, as do_bench medians;
   and fwd_ws for paper-128m (H = 6, d_h = 128: the same d_model, d_ff and FLOPs) for the d_h = 128
   rate. Prints tables; writes dh96.json under $OUT (or the current directory). About a minute.

    PYTHONUNBUFFERED=1 python -m benchmarks.check_dh96
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import replace

import torch

import flashmhf_runtime as fm
from benchmarks.common import argument_parser, out_dir, preset_spec, use_empty_user_cache
from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.timing import median_ms, tflops
from flashmhf.checks import core_inputs, reference_f64, rel_error
from flashmhf.codegen import Config, Spec, format_config, get_kind, load
from flashmhf.codegen.kinds import FORWARD
from flashmhf.tuner.precompile import precompile
from flashmhf_runtime import PRESETS, op

DEV = "cuda"
TOL = 1e-2  # bf16
WS, PLAIN = get_kind("fwd_ws"), get_kind("fwd")
ACC_TOKENS = (1, 100, 1024, 4096, 16384)
TIME_TOKENS = (1024, 4096, 16384)
# The plain kind's configs tried next to its default (those its reject rules keep): TMA tiles.
PLAIN_GRID = [dict(block_m=bm, block_f=bf, num_warps=w, num_stages=st, split=1, tma=1)
              for bm in (64, 128) for bf in (32, 64) for w in (4, 8) for st in (2, 3, 4)]


def repo_128m(kind: str, kv_heads: int | None = None) -> Spec:
    spec = preset_spec(kind, "repo-128m")
    return spec if kv_heads is None else replace(spec, n_kv_heads=kv_heads)


def run(spec: Spec, config: Config, inputs) -> torch.Tensor:
    q = inputs[0]
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    load(spec).launch(*inputs, out, **config)
    return out


def accuracy_cases() -> list[tuple[Spec, Config, int]]:
    spec, shared = repo_128m("fwd_ws"), repo_128m("fwd_ws", kv_heads=2)
    cases = [(spec, WS.default(spec, t), t) for t in ACC_TOKENS]
    cases += [(spec, c, 1100) for c in WS.space(spec)]  # an odd count: the last program is partial
    cases += [(shared, WS.default(shared, 4096), t) for t in (100, 4096)]
    return cases


def accuracy() -> list[dict]:
    rows = []
    for spec, config, tokens in accuracy_cases():
        inputs = core_inputs(spec, tokens, torch.bfloat16, DEV, seed=tokens)
        err = rel_error(run(spec, config, inputs), reference_f64(*inputs))
        rows.append(dict(spec=spec.label(), config=config, tokens=tokens, rel_err=err, ok=err <= TOL))
        print(f"acc {spec.label():32s} T={tokens:6d} {format_config(config):28s} rel_err={err:.2e} "
              f"{'OK' if err <= TOL else 'FAIL'}", flush=True)
    return rows


def op_choice() -> dict:
    """The op on repo-128m at 4096 tokens: which kind it runs, and its error."""
    spec = repo_128m("fwd_ws")
    shape_key = (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.n_experts, spec.expert_dim, spec.dtype)
    kind = op.kind_for(FORWARD, shape_key, 4096, torch.device(DEV))
    inputs = core_inputs(spec, 4096, torch.bfloat16, DEV, seed=11)
    err = rel_error(fm.flash_mhf(*inputs), reference_f64(*inputs))
    print(f"op  repo-128m T=4096 runs {kind}: rel_err={err:.2e}", flush=True)
    return dict(kind=kind, rel_err=err, ok=kind == "fwd_ws" and err <= TOL)


def timed(spec: Spec, config: Config, inputs, flop: float) -> dict:
    out = torch.empty_like(inputs[0])
    fn = functools.partial(load(spec).launch, *inputs, out, **config)
    ms = median_ms(fn)
    return dict(config=config, ms=ms, tflops=tflops(flop, ms))


def timings() -> list[dict]:
    ws, plain, ws128 = repo_128m("fwd_ws"), repo_128m("fwd"), preset_spec("fwd_ws", "paper-128m")
    p = PRESETS["repo-128m"]
    rows = []
    for tokens in TIME_TOKENS:
        flop = PLAIN.flops(plain, tokens)
        inputs = core_inputs(ws, tokens, torch.bfloat16, DEV, seed=2000 + tokens)
        x = torch.randn(tokens, p.d_model, device=DEV, dtype=torch.bfloat16)
        sw_ms = median_ms(functools.partial(swiglu, x, *swiglu_weights(p.d_model, p.d_ff, DEV, torch.bfloat16)))
        ws_rows = [dict(timed(ws, c, inputs, flop), default=c == WS.default(ws, tokens)) for c in WS.space(ws)]
        plain_default = PLAIN.default(plain, tokens)
        plain_rows = [dict(timed(plain, c, inputs, flop), default=c == plain_default)
                      for c in [plain_default] + [c for c in PLAIN_GRID if c != plain_default]
                      if PLAIN.reject(plain, c, tokens) is None]
        inputs128 = core_inputs(ws128, tokens, torch.bfloat16, DEV, seed=3000 + tokens)
        ws128_row = timed(ws128, WS.default(ws128, tokens), inputs128, WS.flops(ws128, tokens))
        row = dict(tokens=tokens, swiglu=dict(ms=sw_ms, tflops=tflops(flop, sw_ms)), fwd_ws=ws_rows, fwd=plain_rows,
                   fwd_ws_dh128=ws128_row)
        rows.append(row)
        for name, r in (("fwd_ws", ws_rows), ("fwd", plain_rows)):
            for x in r:
                print(f"    T={tokens:6d} {name:7s} {x['ms']:.4f} ms ({x['tflops']:4.0f} TF) "
                      f"{format_config(x['config'])}{' (default)' if x['default'] else ''}", flush=True)
    return rows


def table(rows: list[dict]) -> None:
    print("\nrepo-128m (H 8, d_h 96, E 8 x 256) forward, bf16; paper-128m = H 6, d_h 128, same FLOPs")
    print("| T | SwiGLU ms (TF/s) | fwd_ws default | fwd_ws best | fwd default | fwd best | "
          "fwd_ws best speed-up over fwd best | over SwiGLU | fwd_ws d_h 128 (paper-128m) |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: f"{x['ms']:.4f} ({x['tflops']:.0f})"  # noqa: E731
    for row in rows:
        ws_best = min(row["fwd_ws"], key=lambda x: x["ms"])
        plain_best = min(row["fwd"], key=lambda x: x["ms"])
        ws_default = next(x for x in row["fwd_ws"] if x["default"])
        plain_default = next(x for x in row["fwd"] if x["default"])
        print(f"| {row['tokens']} | {fmt(row['swiglu'])} | {fmt(ws_default)} | {fmt(ws_best)} "
              f"{format_config(ws_best['config'])} | {fmt(plain_default)} | {fmt(plain_best)} | "
              f"{plain_best['ms'] / ws_best['ms']:.2f}x | {row['swiglu']['ms'] / ws_best['ms']:.2f}x | "
              f"{fmt(row['fwd_ws_dh128'])} |")


def compile_all() -> None:
    """Compile every kernel this run launches in parallel processes first (Gluon compiles are slow)."""
    ws, plain, ws128 = repo_128m("fwd_ws"), repo_128m("fwd"), preset_spec("fwd_ws", "paper-128m")
    jobs = accuracy_cases() + [(ws, c, 4096) for c in WS.space(ws)]
    jobs += [(plain, c, t) for t in TIME_TOKENS for c in PLAIN_GRID + [PLAIN.default(plain, t)]
             if PLAIN.reject(plain, c, t) is None]
    jobs += [(ws128, WS.default(ws128, 4096), 4096)]
    # Kernels are specialised on the token count being 1 or a multiple of 16: one compile per class.
    jobs = list({(s, format_config(c), t == 1, t % 16 == 0): (s, c, t) for s, c, t in jobs}.values())
    t0 = time.time()
    errors = [e for e in precompile(jobs) if e]
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s; errors: {errors or 'none'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argument_parser(__spec__.name, __doc__).parse_args(argv)
    use_empty_user_cache()  # the op must choose as it would for a user with nothing tuned
    t0 = time.time()
    compile_all()
    report = dict(device=torch.cuda.get_device_name(), accuracy=accuracy(), op=op_choice())
    report["timings"] = timings()
    (out_dir() / "dh96.json").write_text(json.dumps(report, indent=1, default=str))
    table(report["timings"])
    failed = [r for r in report["accuracy"] if not r["ok"]] + ([] if report["op"]["ok"] else [report["op"]])
    print(f"\n{'FAILED: ' + str(len(failed)) if failed else 'all accurate'} ({time.time() - t0:.0f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
