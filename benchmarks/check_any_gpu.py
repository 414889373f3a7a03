"""GPU check of "any GPU, any shape" (issue 13), in one run on one GPU (an H200 is what we have):

1. Odd layer shapes through ``fm.flash_mhf`` in bf16 with gradients, against float64: d_e = 17 and
   200 (padded to 32 and 208), d_h = 24, 40 (masked), 20 (padded to 24) and 96, H_kv < H, at decode
   and training token counts; and d_h = 264, which must run on the reference with one warning.
2. The untuned defaults chosen for sm_80, sm_86 and sm_89 (smaller tiles, no TMA for the forward),
   run on this GPU next to this GPU's own defaults: each must run and be correct; their times show
   what an A100/L40 default costs on a Hopper part (they are not A100 timings).

Prints tables; writes JSON under $OUT (or the current directory).

    PYTHONUNBUFFERED=1 python -m benchmarks.check_any_gpu [--quick]
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings

import torch

import flashmhf_runtime as fm
from benchmarks.common import argument_parser, out_dir
from flashmhf.bench.timing import median_ms, tflops
from flashmhf.cache.device import device_arch
from flashmhf.checks import core_inputs, reference_f64, reference_grads_f64, rel_error
from flashmhf.codegen import Spec, format_config, get_kind
from flashmhf.codegen.arch import ARCHS
from flashmhf.codegen.spec import kernel_dims
from flashmhf.tuner.harness import GRAD_TOLERANCE, TOLERANCE, make_problem
from flashmhf_runtime import PRESETS, op

DEV = "cuda"
# (H, H_kv, d_h, E, d_e)
ODD_SHAPES = [
    (4, 4, 24, 8, 17),
    (4, 2, 40, 6, 200),
    (8, 8, 20, 4, 40),
    (8, 8, 96, 8, 256),  # repo-128m widths
    (16, 4, 128, 22, 256),  # repo-1.3b with 4 heads per kv head
    (8, 8, 64, 4, 100),  # the Hopper kinds' head dim with a padded d_e (they cannot take it)
]
ODD_TOKENS = (1, 77, 1024, 4096)
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_PRESETS = ("repo-128m", "paper-370m", "repo-1.3b")
DEFAULT_TOKENS = (1, 64, 1024, 16384)


def odd_shapes(tokens_list) -> list[dict]:
    rows = []
    for shape in ODD_SHAPES:
        for tokens in tokens_list:
            q, k, u, v, r = core_inputs(shape, tokens, torch.bfloat16, DEV, seed=tokens)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, u, v, r)]
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                s = fm.flash_mhf(*leaves)
                ds = torch.randn_like(s)
                grads = torch.autograd.grad(s, leaves, ds)
            torch.cuda.synchronize()
            errs = [rel_error(s, reference_f64(q, k, u, v, r))]
            errs += [rel_error(g, ref) for g, ref in zip(grads, reference_grads_f64(q, k, u, v, r, ds))]
            ok = errs[0] <= TOLERANCE["bf16"] and max(errs[1:]) <= GRAD_TOLERANCE["bf16"]
            fallback = [str(w.message) for w in said if "reference" in str(w.message)]
            kinds = op.kernel_kinds((*shape, "bf16"), tokens, torch.device(DEV))
            ms = median_ms(functools.partial(_fwd_bwd, leaves, ds))
            row = {"shape": shape, "kernel_dims": kernel_dims(shape[2], shape[4]), "tokens": tokens, "kinds": kinds,
                   "rel_err": errs, "ok": ok and not fallback, "fallback_warnings": fallback, "fwd_bwd_ms": ms}
            rows.append(row)
            print(f"odd H{shape[0]}/{shape[1]} d_h{shape[2]} E{shape[3]}x{shape[4]} T={tokens:5d} "
                  f"{'/'.join(kinds.values()):32s} s {errs[0]:.1e} grads {max(errs[1:]):.1e} {ms:.3f} ms "
                  f"{'OK' if row['ok'] else 'FAIL'}", flush=True)
    rows.append(_wide_head())
    return rows


def _wide_head() -> dict:
    """d_h = 264: the reference runs, with exactly one warning naming the limit."""
    q, k, u, v, r = core_inputs((2, 2, 264, 2, 64), 33, torch.bfloat16, DEV, seed=0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, u, v, r)]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(2):
            s = fm.flash_mhf(*leaves)
            torch.autograd.grad(s.sum(), leaves)
    told = [str(w.message) for w in said if "reference" in str(w.message)]
    err = rel_error(s, reference_f64(q, k, u, v, r))
    ok = len(told) == 1 and "256" in told[0] and err <= TOLERANCE["bf16"]
    print(f"wide head d_h264: {len(told)} warning(s), rel_err {err:.1e} {'OK' if ok else 'FAIL'}", flush=True)
    return {"shape": (2, 2, 264, 2, 64), "warnings": told, "rel_err": err, "ok": ok}


def foreign_defaults(presets, tokens_list, archs) -> list[dict]:
    """Each arch's default config of the Triton kinds every arch runs (fwd, bwd_dq, bwd_dkuv),
    launched on this GPU: checked against float64, then timed."""
    here = device_arch()
    rows = []
    for name in presets:
        p = PRESETS[name]
        d_h, d_e = kernel_dims(p.head_dim, p.expert_dim)
        for arch_name in archs:
            arch = ARCHS[arch_name]
            for kind_name in ("fwd", "bwd_dq", "bwd_dkuv"):
                kind = get_kind(kind_name)
                spec = Spec(kind_name, p.n_heads, p.kv_heads, d_h, p.n_experts, d_e, "bf16")
                for tokens in tokens_list:
                    config = kind.default(spec, tokens, arch)
                    problem = make_problem(spec, tokens, DEV, seed=tokens)
                    t0 = time.monotonic()
                    try:
                        err = problem.check(config)
                        ms = median_ms(lambda problem=problem, config=config: problem.run(config),
                                       graph=tokens <= 64)
                        status = "ok" if err <= problem.tolerance else "wrong"
                    except Exception as exc:  # noqa: BLE001 - a default that does not run is the finding
                        err, ms, status = float("nan"), float("nan"), f"{type(exc).__name__}: {str(exc)[:120]}"
                    tf = tflops(kind.flops(spec, tokens), ms) if ms == ms else float("nan")
                    rows.append({"preset": name, "arch": arch_name, "kind": kind_name, "tokens": tokens,
                                 "config": config, "rel_err": err, "ms": ms, "tflops": tf, "status": status,
                                 "compile_s": time.monotonic() - t0, "this_gpu": here.name})
                    print(f"default {name:10s} {arch_name} {kind_name:8s} T={tokens:5d} {format_config(config):70s} "
                          f"{ms:8.3f} ms {tf:5.0f} TFLOP/s err {err:.1e} {status}", flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    """Markdown: per (preset, kind, tokens), the time of each arch's default on this GPU."""
    archs = sorted({r["arch"] for r in rows})
    lines = ["| preset | kind | T | " + " | ".join(f"{a} default ms" for a in archs) + " |",
             "|---|---|---|" + "---|" * len(archs)]
    keys = sorted({(r["preset"], r["kind"], r["tokens"]) for r in rows})
    for key in keys:
        cells = []
        for a in archs:
            hit = [r for r in rows if (r["preset"], r["kind"], r["tokens"], r["arch"]) == (*key, a)]
            if not hit:
                cells.append("")
            else:
                cells.append(f"{hit[0]['ms']:.3f}" if hit[0]["status"] == "ok" else hit[0]["status"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fwd_bwd(leaves: list[torch.Tensor], ds: torch.Tensor):
    return torch.autograd.grad(fm.flash_mhf(*leaves), leaves, ds)


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer token counts and presets")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    out = out_dir()
    print(f"GPU {torch.cuda.get_device_name()} -> {device_arch().label()}; torch {torch.__version__}", flush=True)
    odd = odd_shapes((77, 4096) if args.quick else ODD_TOKENS)
    defaults = foreign_defaults(("repo-1.3b",) if args.quick else DEFAULT_PRESETS,
                                (1, 16384) if args.quick else DEFAULT_TOKENS, DEFAULT_ARCHS)
    table = _table(defaults)
    print("\n" + table)
    failed = [r for r in odd if not r["ok"]] + [r for r in defaults if r["status"] != "ok"]
    with open(out / "check_any_gpu.json", "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "odd_shapes": odd, "defaults": defaults,
                   "defaults_table": table, "failed": len(failed)}, f, indent=1, default=str)
    print(f"\n{len(failed)} failure(s)" if failed else "\nall odd shapes match float64; every arch's defaults run")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
