"""GPU check of the backward (bwd_dq + the dK/dU/dV kind the op picks: bwd_dkuv_ws on Hopper) and of
the op's autograd, in one run (~3-4 min):

1. accuracy: every preset, bf16, T in {1, 77, 4096} (plus a grouped-kv case): the five gradients of
   the kernels (launched on NaN-poisoned outputs with the configs dispatch picks) against autograd of
   the float64 reference, rel. Frobenius error <= 2e-2; and the public op's autograd at T = 77;
2. CUDA-graph capture of fwd+bwd through the public op, replayed against eager;
3. speed and memory: repo-1.3b and paper-1.3b at T in {4096, 16384}: core fwd+bwd (and per kernel)
   vs SwiGLU eager and torch.compile'd, TFLOP/s with FLOPs = 3 * 6*T*d_model*d_ff, peak memory above
   the inputs of one fwd+bwd;
4. a small sweep of configs per backward kind at T = 16384 for repo-1.3b, including the one-pass
   bwd_fused (fp32 atomics for dq; not used by the op) checked against the pair.

Configs come from FLASHMHF_CACHE and the shipped caches only (the user's own cache is set aside), else
each kind's default. Prints tables; writes backward.json under $OUT (or the current directory).

    PYTHONUNBUFFERED=1 python -m benchmarks.check_backward [--no-compile] [--no-sweep]
"""

from __future__ import annotations

import functools
import json
import time
import warnings

import torch

from benchmarks.common import argument_parser, out_dir, use_empty_user_cache
from flashmhf.bench.baselines import swiglu
from flashmhf.bench.timing import median_ms, peak_mib
from flashmhf.checks import reference_grads_f64, rel_error

DEV = "cuda"
TOL = 2e-2
KINDS = ("fwd", "bwd_dq", "bwd_dkuv")
ACC_TOKENS = (1, 77, 4096)
SPEED_PRESETS = ("repo-1.3b", "paper-1.3b")
SPEED_TOKENS = (4096, 16384)
SWEEP_PRESET, SWEEP_TOKENS = "repo-1.3b", 16384
SWEEP = {
    "bwd_dq": [
        dict(block_m=128, block_f=64, num_warps=8, num_stages=2),
        dict(block_m=128, block_f=32, num_warps=8, num_stages=3),
        dict(block_m=64, block_f=64, num_warps=4, num_stages=3),
        dict(block_m=64, block_f=128, num_warps=8, num_stages=2),
        dict(block_m=128, block_f=64, num_warps=8, num_stages=1),
        dict(block_m=64, block_f=64, num_warps=8, num_stages=3),
    ],
    "bwd_dkuv_ws": [
        dict(block_m=64, num_stages=2, coef_fp32=0),
        dict(block_m=64, num_stages=3, coef_fp32=0),
        dict(block_m=64, num_stages=4, coef_fp32=0),
        dict(block_m=64, num_stages=2, coef_fp32=1),
        dict(block_m=32, num_stages=3, coef_fp32=0),
        dict(block_m=32, num_stages=4, coef_fp32=1),
    ],
    "bwd_dkuv": [
        dict(block_f=64, block_m=16, num_warps=4, num_stages=4, split_dv=0, rows_major=0),
        dict(block_f=64, block_m=16, num_warps=4, num_stages=3, split_dv=0, rows_major=0),
        dict(block_f=128, block_m=16, num_warps=8, num_stages=4, split_dv=0, rows_major=0),
        dict(block_f=64, block_m=32, num_warps=4, num_stages=3, split_dv=1, rows_major=0),
        dict(block_f=64, block_m=128, num_warps=8, num_stages=2, split_dv=1, rows_major=1),
        dict(block_f=32, block_m=64, num_warps=4, num_stages=3, split_dv=0, rows_major=0),
    ],
    # One pass with fp32 atomics for dq (needs a T x H x d_h fp32 workspace); compared with the pair.
    "bwd_fused": [
        dict(block_f=64, block_m=32, num_warps=8, num_stages=2),
        dict(block_f=64, block_m=16, num_warps=8, num_stages=3),
        dict(block_f=32, block_m=64, num_warps=4, num_stages=2),
        dict(block_f=32, block_m=32, num_warps=4, num_stages=3),
    ],
}
T0 = time.time()
DEADLINE_S = 210  # the sweep stops adding configs past this many seconds of the run


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- inputs


def shape_of(preset: str, kv_heads: int | None = None) -> tuple[int, int, int, int, int]:
    from flashmhf_runtime import PRESETS

    p = PRESETS[preset]
    return p.n_heads, kv_heads or p.kv_heads, p.head_dim, p.n_experts, p.expert_dim


def make_inputs(shape, tokens: int, seed: int, device: str | None = None):
    """q ~ N(0,1), weights ~ N(0, 1/d_h) in bf16, r on the simplex in fp32, ds ~ N(0,1) in bf16."""
    h, h_kv, d_h, e, d_e = shape
    device = device or DEV
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=g)
    q = torch.randn(tokens, h, d_h, **kw).bfloat16()
    k, u, v = ((torch.randn(h_kv, e, d_e, d_h, **kw) * d_h**-0.5).bfloat16() for _ in range(3))
    r = torch.softmax(torch.randn(tokens, h, e, **kw), -1)
    ds = torch.randn(tokens, h, d_h, **kw).bfloat16()
    return q, k, u, v, r, ds


def outputs(kind: str, q, k, r, fill=float("nan")):
    if kind.startswith("fwd"):
        return (torch.full_like(q, fill),)
    if kind.startswith("bwd_dq"):
        return torch.full_like(q, fill), torch.full_like(r, fill)
    if kind == "bwd_fused":  # (dq, dk, du, dv, dr)
        return torch.full_like(q, fill), *(torch.full_like(k, fill) for _ in range(3)), torch.full_like(r, fill)
    return tuple(torch.full_like(k, fill) for _ in range(3))


def launch(kind: str, shape, config: dict, q, k, u, v, r, ds, outs) -> None:
    from flashmhf.codegen import Spec, load

    args = (q, k, u, v, r) if kind.startswith("fwd") else (q, k, u, v, r, ds)
    load(Spec(kind, *shape, "bf16")).launch(*args, *outs, **config)


def job_key(kind: str, shape: tuple, config: dict, tokens: int) -> tuple:
    return kind, shape, tuple(sorted(config.items())), tokens


def precompile(jobs: list[tuple]) -> dict[tuple, str | None]:
    """Compile every (kind, shape, config, tokens) once, in parallel processes (Triton's disk cache)."""
    from flashmhf.codegen import Spec
    from flashmhf.tuner.precompile import precompile as compile_all

    keys = list(dict.fromkeys(job_key(*job) for job in jobs))
    errors = compile_all([(Spec(kind, *shape, "bf16"), dict(cfg), tokens) for kind, shape, cfg, tokens in keys])
    return dict(zip(keys, errors))


def chosen_config(kind: str, shape, tokens: int) -> dict:
    """The config dispatch would use (tuned if the cache has one, else the default)."""
    from flashmhf.cache.device import device_info
    from flashmhf.codegen import Spec
    from flashmhf_runtime.dispatch import choose_config

    return dict(choose_config(Spec(kind, *shape, "bf16"), tokens, device_info(torch.cuda.current_device()))[0])


def op_kinds(shape, tokens: int) -> tuple[str, str, str]:
    """The kinds the op runs here for the forward, dq/dr and dK/dU/dV (the *_ws ones on Hopper where
    the shape and token count allow)."""
    from flashmhf_runtime import op

    kinds = op.kernel_kinds((*shape, "bf16"), tokens, torch.device(DEV))
    return kinds["forward"], kinds["dq"], kinds["dkuv"]


# ------------------------------------------------------------------------------------------- checks

GRADS = ("dq", "dk", "du", "dv", "dr")


def accuracy_cases():
    from flashmhf_runtime import PRESETS

    cases = [(name, None, t) for name in PRESETS for t in ACC_TOKENS]
    cases.append(("repo-1.3b", 4, 77))  # H_kv < H: 4 heads share each kv head
    return cases


def accuracy() -> list[dict]:
    import flashmhf_runtime as fm

    rows = []
    for name, kv, tokens in accuracy_cases():
        shape = shape_of(name, kv)
        q, k, u, v, r, ds = make_inputs(shape, tokens, seed=tokens)
        ref = reference_grads_f64(q, k, u, v, r, ds)
        _, dqk, dkuv = op_kinds(shape, tokens)
        cfg = {dqk: chosen_config(dqk, shape, tokens), dkuv: chosen_config(dkuv, shape, tokens)}
        dq, dr = outputs(dqk, q, k, r)
        dk, du, dv = outputs("bwd_dkuv", q, k, r)
        launch(dqk, shape, cfg[dqk], q, k, u, v, r, ds, (dq, dr))
        launch(dkuv, shape, cfg[dkuv], q, k, u, v, r, ds, (dk, du, dv))
        errs = {g: rel_error(o, w) for g, o, w in zip(GRADS, (dq, dk, du, dv, dr), ref)}
        row = {"preset": name, "kv_heads": shape[1], "tokens": tokens, "configs": cfg, "rel_err": errs}
        if tokens == 77:  # the public op end to end: forward + autograd through flashmhf::core_bwd
            leaves = [t.clone().requires_grad_() for t in (q, k, u, v, r)]
            s = fm.flash_mhf(*leaves)
            op_grads = torch.autograd.grad(s, leaves, ds)
            row["op_rel_err"] = {g: rel_error(o, w) for g, o, w in zip(GRADS, op_grads, ref)}
            errs = {**errs, **{f"op_{g}": e for g, e in row["op_rel_err"].items()}}
        row["ok"] = max(errs.values()) <= TOL
        rows.append(row)
        worst = max(errs, key=errs.get)
        log(f"acc {name:10s} kv={shape[1]:2d} T={tokens:5d} worst {worst}={errs[worst]:.2e} "
            f"{'OK' if row['ok'] else 'FAIL'}  ({dqk} {cfg[dqk]}, {dkuv} {cfg[dkuv]})")
        del ref
    return rows


def cuda_graph_check() -> dict:
    """Capture forward + backward through the public op in one CUDA graph; replay == eager."""
    import flashmhf_runtime as fm

    shape = shape_of("repo-128m")
    q, k, u, v, r, ds = make_inputs(shape, 77, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, u, v, r)]

    def step():
        return torch.autograd.grad(fm.flash_mhf(*leaves), leaves, ds)

    try:
        eager = step()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
        diff = max(rel_error(a, b) for a, b in zip(captured, eager))
        res = {"ok": diff <= 1e-6, "max_rel_diff": diff}
    except Exception as exc:  # noqa: BLE001
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    log(f"cuda graph capture of fwd+bwd: {res}")
    return res


# ------------------------------------------------------------------------------------------- speed


def speed_case(name: str, tokens: int, compiled_swiglu) -> dict:
    import flashmhf_runtime as fm
    from flashmhf_runtime import PRESETS, op

    p = PRESETS[name]
    shape = shape_of(name)
    flop = 3 * 6.0 * tokens * p.d_model * p.d_ff
    q, k, u, v, r, ds = make_inputs(shape, tokens, seed=100 + tokens)
    leaves = [t.requires_grad_() for t in (q, k, u, v, r)]

    def core():
        s = fm.flash_mhf(*leaves)
        return torch.autograd.grad(s, leaves, ds)

    core()  # the first call compiles and picks configs
    row = {"preset": name, "tokens": tokens, "flop": flop}
    row["core_ms"] = median_ms(core)
    op.BACKWARD_ON_TWO_STREAMS = False  # the two backward kernels one after the other, same run
    try:
        row["core_serial_ms"] = median_ms(core)
    finally:
        op.BACKWARD_ON_TWO_STREAMS = True
    row["core_peak_mib"] = peak_mib(core)
    fwd, dqk, dkuv = op_kinds(shape, tokens)
    kinds = tuple(dict.fromkeys((*KINDS, dkuv, fwd, dqk)))  # the op's kinds and the Triton ones
    cfg = {kind: chosen_config(kind, shape, tokens) for kind in kinds}
    row["configs"] = cfg
    row["dkuv_kind"] = dkuv
    row["fwd_kind"] = fwd
    row["dq_kind"] = dqk
    for kind in kinds:  # each kernel alone, on preallocated outputs
        outs = outputs(kind, q, k, r, fill=0.0)
        args = (kind, shape, cfg[kind], q, k, u, v, r, ds, outs)
        row[f"{kind}_ms"] = median_ms(lambda args=args: launch(*args))

    x = torch.randn(tokens, p.d_model, device=DEV, dtype=torch.bfloat16)
    std = p.d_model**-0.5
    wg, wu = ((torch.randn(p.d_ff, p.d_model, device=DEV) * std).bfloat16() for _ in range(2))
    wd = (torch.randn(p.d_model, p.d_ff, device=DEV) * p.d_ff**-0.5).bfloat16()
    sw_leaves = [t.requires_grad_() for t in (x, wg, wu, wd)]
    dy = torch.randn(tokens, p.d_model, device=DEV, dtype=torch.bfloat16)

    def eager():
        return torch.autograd.grad(swiglu(*sw_leaves), sw_leaves, dy)

    row["swiglu_ms"] = median_ms(eager)
    row["swiglu_peak_mib"] = peak_mib(eager)
    if compiled_swiglu is not None:

        def comp():
            return torch.autograd.grad(compiled_swiglu(*sw_leaves), sw_leaves, dy)

        try:
            t = time.time()
            comp()
            row["swiglu_compile_s"] = time.time() - t
            row["swiglu_compiled_ms"] = median_ms(comp)
            row["swiglu_compiled_peak_mib"] = peak_mib(comp)
        except Exception as exc:  # noqa: BLE001
            row["swiglu_compiled_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for key in ("core", "swiglu", "swiglu_compiled"):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = flop / (row[f"{key}_ms"] * 1e-3) / 1e12
    comp_ms = row.get("swiglu_compiled_ms", float("nan"))
    log(f"speed {name} T={tokens}: core {row['core_ms']:.3f} ms ({row['core_tflops']:.0f} TF; "
        f"{row['core_serial_ms']:.3f} ms with the backward kernels one after the other; "
        f"{fwd} {row[f'{fwd}_ms']:.3f} + {dqk} {row[f'{dqk}_ms']:.3f} + {dkuv} {row[f'{dkuv}_ms']:.3f}; "
        f"bwd_dkuv alone {row['bwd_dkuv_ms']:.3f}), "
        f"peak {row['core_peak_mib']:.0f} MiB | swiglu {row['swiglu_ms']:.3f} ms, peak {row['swiglu_peak_mib']:.0f} MiB"
        f" | compiled {comp_ms:.3f} ms")
    return row


def speed(use_compile: bool) -> list[dict]:
    compiled_swiglu = torch.compile(swiglu) if use_compile else None
    rows = []
    for name in SPEED_PRESETS:
        for tokens in SPEED_TOKENS:
            rows.append(speed_case(name, tokens, compiled_swiglu))
            torch.cuda.empty_cache()
    return rows


def sweep(compile_errors: dict) -> list[dict]:
    from flashmhf.codegen import Spec, get_kind

    name, tokens = SWEEP_PRESET, SWEEP_TOKENS
    shape = shape_of(name)
    q, k, u, v, r, ds = make_inputs(shape, tokens, seed=7)
    rows = []
    for kind, configs in SWEEP.items():
        kk = get_kind(kind)
        spec = Spec(kind, *shape, "bf16")
        default = kk.default(spec, tokens)
        if kind == "bwd_fused":  # checked against the two-kernel pair's defaults
            dq_dr, dkuv = (outputs(x, q, k, r) for x in ("bwd_dq", "bwd_dkuv"))
            for x, outs in (("bwd_dq", dq_dr), ("bwd_dkuv", dkuv)):
                launch(x, shape, get_kind(x).default(Spec(x, *shape, "bf16"), tokens), q, k, u, v, r, ds, outs)
            base = (dq_dr[0], *dkuv, dq_dr[1])
        else:
            base = outputs(kind, q, k, r)
            launch(kind, shape, default, q, k, u, v, r, ds, base)
        flop = kk.flops(spec, tokens)
        for cfg in [default] + [c for c in configs if c != default]:
            if time.time() - T0 > DEADLINE_S and cfg != default:
                log(f"sweep {kind}: past {DEADLINE_S} s, skipping the remaining configs")
                break
            row = {"kind": kind, "config": cfg, "default": cfg == default}
            reason = kk.reject(spec, cfg, tokens)
            err = compile_errors.get(job_key(kind, shape, cfg, tokens))
            if reason or err:
                row["status"] = "rejected" if reason else "compile-error"
                row["why"] = reason or err
            else:
                outs = outputs(kind, q, k, r)
                try:
                    launch(kind, shape, cfg, q, k, u, v, r, ds, outs)
                    diff = max(rel_error(o, b) for o, b in zip(outs, base))
                    ms = median_ms(functools.partial(launch, kind, shape, cfg, q, k, u, v, r, ds, outs))
                    row.update(status="ok" if diff <= 1e-2 else "wrong-result", ms=ms, tflops=flop / ms / 1e9,
                               rel_diff_vs_default=diff)
                except Exception as exc:  # noqa: BLE001
                    row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
            shown = f"{row['ms']:.3f} ms ({row['tflops']:.0f} TF)" if "ms" in row else row.get("why", "")[:70]
            log(f"sweep {kind:8s} {'*' if row['default'] else ' '} {row_config(cfg):45s} {row['status']:12s} {shown}")
    return rows


def row_config(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


# ------------------------------------------------------------------------------------------- main


def isolate_configs() -> None:
    """Shipped results (or FLASHMHF_CACHE's) else defaults: set the user's cache aside, and do not warn
    about untuned shapes (defaults are expected here)."""
    use_empty_user_cache()
    warnings.filterwarnings("ignore", message="flashmhf: no tuned")


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile'd SwiGLU")
    ap.add_argument("--no-sweep", action="store_true", help="skip the config sweep")
    args = ap.parse_args(argv)
    isolate_configs()
    import triton

    from flashmhf.codegen import Spec, get_kind

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    log(f"{report}")

    jobs = []
    for name, kv, tokens in accuracy_cases():
        shape = shape_of(name, kv)
        jobs += [(kind, shape, chosen_config(kind, shape, tokens), tokens) for kind in KINDS]
    for name in SPEED_PRESETS:
        for tokens in SPEED_TOKENS:
            shape = shape_of(name)
            jobs += [(kind, shape, chosen_config(kind, shape, tokens), tokens) for kind in KINDS]
    if not args.no_sweep:
        shape = shape_of(SWEEP_PRESET)
        for kind, configs in SWEEP.items():
            spec = Spec(kind, *shape, "bf16")
            configs = [get_kind(kind).default(spec, SWEEP_TOKENS), *configs]
            jobs += [(kind, shape, c, SWEEP_TOKENS) for c in configs
                     if get_kind(kind).reject(spec, c, SWEEP_TOKENS) is None]
    t = time.time()
    compile_errors = precompile(jobs)
    failed = {k: e for k, e in compile_errors.items() if e}
    report["precompile"] = {"jobs": len(compile_errors), "seconds": time.time() - t,
                            "failed": {repr(k): e for k, e in failed.items()}}
    log(f"precompiled {len(compile_errors)} kernels in {time.time() - t:.0f} s, {len(failed)} failed")
    for k, e in failed.items():
        log(f"  compile failed: {k}: {e[:200]}")

    report["accuracy"] = accuracy()
    report["cuda_graph"] = cuda_graph_check()
    report["speed"] = speed(not args.no_compile)
    if not args.no_sweep:
        report["sweep"] = sweep(compile_errors)

    (out_dir() / "backward.json").write_text(json.dumps(report, indent=1, default=str))

    n_ok = sum(r["ok"] for r in report["accuracy"])
    print(f"\naccuracy: {n_ok}/{len(report['accuracy'])} cases within {TOL} "
          f"(worst {max(max(r['rel_err'].values()) for r in report['accuracy']):.2e}); "
          f"cuda graph: {'OK' if report['cuda_graph']['ok'] else 'FAIL'}")
    print("\n| preset | T | core fwd+bwd ms (TF/s) | same, backward kernels serial | fwd / dq / dK-dU-dV ms "
          "(its kind) | bwd_dkuv ms | peak MiB | SwiGLU eager ms (TF/s), peak | SwiGLU compiled ms (TF/s), peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in report["speed"]:
        fk, dqk = x.get("fwd_kind", "fwd"), x.get("dq_kind", "bwd_dq")
        comp = (f"{x['swiglu_compiled_ms']:.3f} ({x['swiglu_compiled_tflops']:.0f}), "
                f"{x['swiglu_compiled_peak_mib']:.0f}" if "swiglu_compiled_ms" in x else "—")
        print(f"| {x['preset']} | {x['tokens']} | {x['core_ms']:.3f} ({x['core_tflops']:.0f}) | "
              f"{x['core_serial_ms']:.3f} | "
              f"{x[fk + '_ms']:.3f} ({fk}) / {x[dqk + '_ms']:.3f} ({dqk}) / "
              f"{x[x['dkuv_kind'] + '_ms']:.3f} ({x['dkuv_kind']}) | "
              f"{x['bwd_dkuv_ms']:.3f} | {x['core_peak_mib']:.0f} | "
              f"{x['swiglu_ms']:.3f} ({x['swiglu_tflops']:.0f}), {x['swiglu_peak_mib']:.0f} | {comp} |")
    if report.get("sweep"):
        print(f"\n| kind | config ({SWEEP_PRESET}, T={SWEEP_TOKENS}) | status | ms (TF/s) |\n|---|---|---|---|")
        for x in report["sweep"]:
            ms = f"{x['ms']:.3f} ({x['tflops']:.0f})" if "ms" in x else x.get("why", "")[:60]
            print(f"| {x['kind']} | {row_config(x['config'])}{' (default)' if x['default'] else ''} | "
                  f"{x['status']} | {ms} |")
    log("done")


if __name__ == "__main__":
    main()
