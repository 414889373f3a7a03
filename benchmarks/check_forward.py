"""GPU check of the forward path: bf16 accuracy of every preset, and forward time of the default
and of a swept grid next to cuBLAS SwiGLU, in one run. Prints tables; writes forward.json under $OUT.

    PYTHONUNBUFFERED=1 python -m benchmarks.check_forward [--quick] [--skip-accuracy]
"""

from __future__ import annotations

import functools
import itertools
import json
import time

import torch

from benchmarks.common import argument_parser, out_dir, preset_spec
from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.timing import median_ms, tflops
from flashmhf.checks import core_inputs, reference_f64, rel_error
from flashmhf.codegen import Spec, format_config, get_kind, load
from flashmhf.tuner.precompile import precompile
from flashmhf_runtime import PRESETS

DEV = "cuda"
KIND = get_kind("fwd")


def spec_of(name: str) -> Spec:
    return preset_spec("fwd", name)


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    mm = median_ms(lambda: a @ b)
    x = torch.empty(2**30, device=DEV, dtype=torch.uint8)
    y = torch.empty_like(x)
    cp = median_ms(lambda: y.copy_(x))
    return {"matmul_tflops": tflops(2 * 8192**3, mm), "copy_tbs": 2 * 2**30 / (cp * 1e-3) / 1e12}


def accuracy(tokens_list) -> list[dict]:
    rows = []
    for name in PRESETS:
        spec = spec_of(name)
        for tokens in tokens_list:
            q, k, u, v, r = core_inputs(spec, tokens, torch.bfloat16, DEV, seed=tokens)
            ref = reference_f64(q, k, u, v, r)
            cfg = KIND.default(spec, tokens)
            out = torch.full_like(q, float("nan"))
            load(spec).launch(q, k, u, v, r, out, **cfg)
            err = rel_error(out, ref)
            rows.append({"preset": name, "tokens": tokens, "config": cfg, "rel_err": err, "ok": err <= 1e-2})
            print(f"acc {name:11s} T={tokens:6d} {format_config(cfg):60s} rel_err={err:.2e} "
                  f"{'OK' if err <= 1e-2 else 'FAIL'}", flush=True)
    return rows


def grid(tokens: int, quick: bool):
    if tokens >= 1024:
        axes = dict(block_m=(64, 128, 256), block_f=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4), split=(1,))
        if quick:
            axes = dict(block_m=(128,), block_f=(64, 128), num_warps=(8,), num_stages=(3,), split=(1,))
    else:
        axes = dict(block_m=(16, 64), block_f=(64, 128), num_warps=(4,), num_stages=(2, 3, 4),
                    split=(1, 4, 8, 16, 32))
        if quick:
            axes = dict(block_m=(16,), block_f=(64,), num_warps=(4,), num_stages=(3,), split=(8, 16))
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


def sweep(names, tokens_list, quick: bool) -> list[dict]:
    jobs = []
    for name in names:
        spec = spec_of(name)
        for tokens in tokens_list:
            for cfg in grid(tokens, quick):
                if KIND.reject(spec, cfg, tokens) is None:
                    jobs.append((spec, cfg, tokens))
            default = KIND.default(spec, tokens)
            if (spec, default, tokens) not in jobs:
                jobs.append((spec, default, tokens))
    t0 = time.time()
    errors = precompile(jobs)
    print(f"precompiled {len(jobs)} kernels in {time.time() - t0:.0f} s "
          f"({sum(e is not None for e in errors)} failed)", flush=True)
    failed = {(j[0], format_config(j[1]), j[2]): e for j, e in zip(jobs, errors) if e}
    results = []
    for name in names:
        spec = spec_of(name)
        p = PRESETS[name]
        for tokens in tokens_list:
            q, k, u, v, r = core_inputs(spec, tokens, torch.bfloat16, DEV, seed=1000 + tokens)
            ref = reference_f64(q, k, u, v, r)
            x = torch.randn(tokens, p.d_model, device=DEV, dtype=torch.bfloat16)
            wg, wu, wd = swiglu_weights(p.d_model, p.d_ff, DEV, torch.bfloat16)
            small = tokens <= 64
            baseline = functools.partial(swiglu, x, wg, wu, wd)
            sw = median_ms(baseline)
            sw_g = median_ms(baseline, graph=True) if small else None
            flop = KIND.flops(spec, tokens)
            default = KIND.default(spec, tokens)
            out = torch.empty_like(q)
            rows = []
            for cfg in [default] + [c for c in grid(tokens, quick) if c != default]:
                if KIND.reject(spec, cfg, tokens) is not None:
                    continue
                key = (spec, format_config(cfg), tokens)
                if key in failed:
                    rows.append({"config": cfg, "status": "compile-error", "error": failed[key]})
                    continue
                out.fill_(float("nan"))
                fn = functools.partial(load(spec).launch, q, k, u, v, r, out, **cfg)
                try:
                    fn()
                    err = rel_error(out, ref)
                    if err > 1e-2:
                        rows.append({"config": cfg, "status": "wrong-result", "rel_err": err})
                        continue
                    ms = median_ms(fn)
                    ms_g = median_ms(fn, graph=True) if small else None
                except Exception as exc:  # noqa: BLE001
                    rows.append({"config": cfg, "status": "error", "error": repr(exc)[:200]})
                    continue
                rows.append({"config": cfg, "status": "ok", "ms": ms, "ms_graph": ms_g, "rel_err": err,
                             "tflops": tflops(flop, ms), "default": cfg == default})
            ok = [x for x in rows if x["status"] == "ok"]
            best = min(ok, key=lambda x: x["ms"]) if ok else None
            dflt = next((x for x in ok if x.get("default")), None)
            res = {"preset": name, "tokens": tokens, "swiglu_ms": sw, "swiglu_graph_ms": sw_g,
                   "swiglu_tflops": tflops(flop, sw), "best": best, "default": dflt, "n_ok": len(ok),
                   "n_tried": len(rows), "rows": rows}
            results.append(res)
            g = f" graph {sw_g:.4f}" if sw_g else ""
            print(f"{name:11s} T={tokens:6d} swiglu {sw:.4f} ms ({tflops(flop, sw):5.0f} TF){g}", flush=True)
            for lbl, x in (("default", dflt), ("best", best)):
                if x:
                    gg = f" graph {x['ms_graph']:.4f}" if x.get("ms_graph") else ""
                    print(f"   {lbl:7s} {x['ms']:.4f} ms ({x['tflops']:5.0f} TF){gg}  {format_config(x['config'])}  "
                          f"err {x['rel_err']:.1e}", flush=True)
            print(f"   ok {len(ok)}/{len(rows)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--quick", action="store_true", help="a few configs per token count instead of the grid")
    ap.add_argument("--skip-accuracy", action="store_true", help="skip the accuracy table of every preset")
    args = ap.parse_args(argv)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    report["triton"] = triton.__version__
    report["ceilings"] = ceilings()
    print("ceilings", report["ceilings"], flush=True)
    if not args.skip_accuracy:
        report["accuracy"] = accuracy((1, 77, 4096, 16384))
    report["sweep"] = sweep(["repo-1.3b", "paper-1.3b"], (1, 64, 1024, 16384), args.quick)
    (out_dir() / "forward.json").write_text(json.dumps(report, indent=1, default=str))
    print("\n| preset | T | SwiGLU ms (TF/s) | default ms (TF/s) | best ms (TF/s) | best config |")
    print("|---|---|---|---|---|---|")
    for x in report["sweep"]:
        d, b = x["default"], x["best"]
        fmt = lambda y: f"{y['ms']:.4f} ({y['tflops']:.0f})" if y else "—"  # noqa: E731
        print(f"| {x['preset']} | {x['tokens']} | {x['swiglu_ms']:.4f} ({x['swiglu_tflops']:.0f}) | {fmt(d)} | "
              f"{fmt(b)} | {format_config(b['config']) if b else '—'} |")


if __name__ == "__main__":
    main()
