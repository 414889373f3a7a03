"""GPU check of the warp-specialized kinds at d_h = 96 (issue 16): the head as column parts of 64 + 32.

1. Accuracy against float64 with poisoned outputs, for repo-128m (H = 8, d_h = 96, E = 8, d_e = 256,
   bf16): fwd_ws (s; relative error <= 1e-2) and bwd_dq_ws (dq and dr; <= 2e-2) at T = 1, 100, 1024,
   4096, 16384 (default config), every config of their spaces at T = 1100, and H_kv = 2; then the op
   (`flash_mhf` forward and backward) at 4096 tokens, which must choose them. Exit 1 on a failure.
2. Time at T = 1024, 4096, 16384 (do_bench medians): each kind's configs, the plain Triton kind it
   replaces (fwd, bwd_dq: default and a small grid), the same kind at d_h = 128 for paper-128m
   (H = 6: the same d_model, d_ff and FLOPs), and cuBLAS SwiGLU's forward of the same d_model and
   d_ff. Prints tables; writes dh96.json under $OUT (or the current directory). About two minutes.

    PYTHONUNBUFFERED=1 python -m benchmarks.check_dh96
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass, replace

import torch

import flashmhf_runtime as fm
from benchmarks.common import argument_parser, out_dir, preset_spec, use_empty_user_cache
from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.timing import median_ms, tflops
from flashmhf.checks import core_inputs, reference_f64, reference_grads_f64, rel_error
from flashmhf.codegen import Config, Spec, format_config, get_kind, load
from flashmhf.codegen.kinds import DQ, FORWARD
from flashmhf.tuner.precompile import precompile
from flashmhf_runtime import PRESETS, op

DEV = "cuda"
ACC_TOKENS = (1, 100, 1024, 4096, 16384)
TIME_TOKENS = (1024, 4096, 16384)
# The plain kinds' configs timed next to their defaults (those their reject rules keep).
_TILES = [dict(block_m=bm, block_f=bf, num_warps=w, num_stages=3)
          for bm in (64, 128) for bf in (32, 64) for w in (4, 8)]


@dataclass(frozen=True)
class Pair:
    """A warp-specialized kind, the plain kind it replaces, and how to check one launch."""

    role: str
    ws: str
    plain: str
    plain_grid: tuple
    tol: float

    def spec(self, kind: str, preset: str = "repo-128m", kv_heads: int | None = None) -> Spec:
        spec = preset_spec(kind, preset)
        return spec if kv_heads is None else replace(spec, n_kv_heads=kv_heads)


PAIRS = (
    Pair("forward", "fwd_ws", "fwd", tuple(dict(c, split=1, tma=1) for c in _TILES), 1e-2),
    Pair("dq", "bwd_dq_ws", "bwd_dq", tuple(_TILES), 2e-2),
)


def inputs_for(pair: Pair, spec: Spec, tokens: int, seed: int) -> tuple:
    q, k, u, v, r = core_inputs(spec, tokens, torch.bfloat16, DEV, seed=seed)
    return (q, k, u, v, r) if pair.role == "forward" else (q, k, u, v, r, torch.randn_like(q))


def poisoned_outputs(pair: Pair, inputs: tuple) -> tuple:
    """NaN-filled outputs: every element must be written."""
    q, r = inputs[0], inputs[4]
    if pair.role == "forward":
        return (torch.full_like(q, float("nan")),)
    return torch.full_like(q, float("nan")), torch.full_like(r, float("nan"))


def errors(pair: Pair, inputs: tuple, outputs: tuple) -> dict[str, float]:
    """Relative error of each output against float64."""
    if pair.role == "forward":
        return {"s": rel_error(outputs[0], reference_f64(*inputs))}
    want = reference_grads_f64(*inputs)
    return {"dq": rel_error(outputs[0], want[0]), "dr": rel_error(outputs[1], want[4])}


def accuracy_cases(pair: Pair) -> list[tuple[Spec, Config, int]]:
    ws = get_kind(pair.ws)
    spec, shared = pair.spec(pair.ws), pair.spec(pair.ws, kv_heads=2)
    cases = [(spec, ws.default(spec, t), t) for t in ACC_TOKENS]
    cases += [(spec, c, 1100) for c in ws.space(spec)]  # an odd count: the last program is partial
    return cases + [(shared, ws.default(shared, 4096), t) for t in (100, 4096)]


def accuracy(pair: Pair) -> list[dict]:
    rows = []
    for spec, config, tokens in accuracy_cases(pair):
        inputs = inputs_for(pair, spec, tokens, seed=tokens)
        outputs = poisoned_outputs(pair, inputs)
        load(spec).launch(*inputs, *outputs, **config)
        errs = errors(pair, inputs, outputs)
        ok = max(errs.values()) <= pair.tol
        rows.append(dict(spec=spec.label(), config=config, tokens=tokens, errors=errs, ok=ok))
        shown = " ".join(f"{k}={v:.2e}" for k, v in errs.items())
        print(f"acc {spec.label():35s} T={tokens:6d} {format_config(config):28s} {shown} {'OK' if ok else 'FAIL'}",
              flush=True)
    return rows


def op_check() -> dict:
    """The op on repo-128m at 4096 tokens: the kinds it runs, and its forward and dq errors."""
    spec = PAIRS[0].spec("fwd_ws")
    key = (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.n_experts, spec.expert_dim, spec.dtype)
    kinds = {role.name: op.kind_for(role, key, 4096, torch.device(DEV)) for role in (FORWARD, DQ)}
    q, k, u, v, r = core_inputs(spec, 4096, torch.bfloat16, DEV, seed=11)
    ds = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, u, v, r)]
    s = fm.flash_mhf(*leaves)
    s.backward(ds)
    want = reference_grads_f64(q, k, u, v, r, ds)
    errs = {"s": rel_error(s.detach(), reference_f64(q, k, u, v, r)), "dq": rel_error(leaves[0].grad, want[0]),
            "dr": rel_error(leaves[4].grad, want[4])}
    ok = kinds == {"forward": "fwd_ws", "dq": "bwd_dq_ws"} and errs["s"] <= 1e-2 and max(errs.values()) <= 2e-2
    print(f"op  repo-128m T=4096 runs {kinds}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
    return dict(kinds=kinds, errors=errs, ok=ok)


def timed(pair: Pair, spec: Spec, config: Config, inputs: tuple, flop: float) -> dict:
    outputs = tuple(torch.empty_like(o) for o in poisoned_outputs(pair, inputs))
    ms = median_ms(functools.partial(load(spec).launch, *inputs, *outputs, **config))
    return dict(config=config, ms=ms, tflops=tflops(flop, ms))


def plain_configs(pair: Pair, tokens: int) -> list[Config]:
    plain, spec = get_kind(pair.plain), pair.spec(pair.plain)
    default = plain.default(spec, tokens)
    return [default] + [c for c in pair.plain_grid if c != default and plain.reject(spec, c, tokens) is None]


def timings(pair: Pair) -> list[dict]:
    ws_kind, plain_kind = get_kind(pair.ws), get_kind(pair.plain)
    ws, plain, ws128 = pair.spec(pair.ws), pair.spec(pair.plain), pair.spec(pair.ws, "paper-128m")
    rows = []
    for tokens in TIME_TOKENS:
        flop = ws_kind.flops(ws, tokens)
        inputs = inputs_for(pair, ws, tokens, seed=2000 + tokens)
        ws_default, plain_default = ws_kind.default(ws, tokens), plain_kind.default(plain, tokens)
        ws_rows = [dict(timed(pair, ws, c, inputs, flop), default=c == ws_default) for c in ws_kind.space(ws)]
        plain_rows = [dict(timed(pair, plain, c, inputs, flop), default=c == plain_default)
                      for c in plain_configs(pair, tokens)]
        inputs128 = inputs_for(pair, ws128, tokens, seed=3000 + tokens)
        row = dict(role=pair.role, tokens=tokens, ws=ws_rows, plain=plain_rows,
                   ws_dh128=timed(pair, ws128, ws_kind.default(ws128, tokens), inputs128, ws_kind.flops(ws128, tokens)))
        if pair.role == "forward":
            p = PRESETS["repo-128m"]
            x = torch.randn(tokens, p.d_model, device=DEV, dtype=torch.bfloat16)
            sw_ms = median_ms(functools.partial(swiglu, x, *swiglu_weights(p.d_model, p.d_ff, DEV, torch.bfloat16)))
            row["swiglu"] = dict(ms=sw_ms, tflops=tflops(flop, sw_ms))
        rows.append(row)
        for name, found in ((pair.ws, ws_rows), (pair.plain, plain_rows)):
            for x in found:
                print(f"    T={tokens:6d} {name:9s} {x['ms']:.4f} ms ({x['tflops']:4.0f} TF) "
                      f"{format_config(x['config'])}{' (default)' if x['default'] else ''}", flush=True)
    return rows


def table(pair: Pair, rows: list[dict]) -> None:
    fmt = lambda x: f"{x['ms']:.4f} ({x['tflops']:.0f})"  # noqa: E731
    swiglu_col = pair.role == "forward"
    print(f"\n{pair.role}: repo-128m (H 8, d_h 96, E 8 x 256), bf16, ms (TFLOP/s); d_h 128 = paper-128m "
          "(H 6, same FLOPs)")
    print(f"| T | {pair.ws} default | {pair.ws} best | {pair.plain} default | {pair.plain} best | "
          f"best {pair.ws} / best {pair.plain} speed | {pair.ws} d_h 128 |"
          + (" SwiGLU | vs SwiGLU |" if swiglu_col else ""))
    print("|---" * (7 + 2 * swiglu_col) + "|")
    for row in rows:
        ws_best, plain_best = (min(row[k], key=lambda x: x["ms"]) for k in ("ws", "plain"))
        ws_default, plain_default = (next(x for x in row[k] if x["default"]) for k in ("ws", "plain"))
        line = (f"| {row['tokens']} | {fmt(ws_default)} | {fmt(ws_best)} {format_config(ws_best['config'])} | "
                f"{fmt(plain_default)} | {fmt(plain_best)} | {plain_best['ms'] / ws_best['ms']:.2f}x | "
                f"{fmt(row['ws_dh128'])} |")
        if swiglu_col:
            line += f" {fmt(row['swiglu'])} | {row['swiglu']['ms'] / ws_best['ms']:.2f}x |"
        print(line)


def compile_all() -> None:
    """Compile every kernel this run launches in parallel processes first (Gluon compiles are slow)."""
    jobs = []
    for pair in PAIRS:
        ws = pair.spec(pair.ws)
        jobs += accuracy_cases(pair) + [(ws, c, 4096) for c in get_kind(pair.ws).space(ws)]
        jobs += [(pair.spec(pair.plain), c, t) for t in TIME_TOKENS for c in plain_configs(pair, t)]
        ws128 = pair.spec(pair.ws, "paper-128m")
        jobs.append((ws128, get_kind(pair.ws).default(ws128, 4096), 4096))
    # Kernels are specialised on the token count being 1 or a multiple of 16: one compile per class.
    jobs = list({(s, format_config(c), t == 1, t % 16 == 0): (s, c, t) for s, c, t in jobs}.values())
    t0 = time.time()
    failed = [e for e in precompile(jobs) if e]
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s; errors: {failed or 'none'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argument_parser(__spec__.name, __doc__).parse_args(argv)
    use_empty_user_cache()  # the op must choose as it would for a user with nothing tuned
    t0 = time.time()
    compile_all()
    report = dict(device=torch.cuda.get_device_name(), accuracy=[r for p in PAIRS for r in accuracy(p)],
                  op=op_check())
    report["timings"] = {p.role: timings(p) for p in PAIRS}
    (out_dir() / "dh96.json").write_text(json.dumps(report, indent=1, default=str))
    for pair in PAIRS:
        table(pair, report["timings"][pair.role])
    failed = [r for r in report["accuracy"] if not r["ok"]] + ([] if report["op"]["ok"] else [report["op"]])
    print(f"\n{'FAILED: ' + str(len(failed)) if failed else 'all accurate'} ({time.time() - t0:.0f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
