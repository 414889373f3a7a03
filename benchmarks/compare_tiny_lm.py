"""GPU check of the layer in training: the tiny LM of examples/train_tiny_lm.py trained with the same
seed, once with the core = fm.flash_mhf (generated Triton kernels, forward and backward) and once
with the fp32 reference core, both under bf16 autocast with fp32 parameters; and a third time with
the reference core in float64, the noise floor: how far two runs of the same maths, rounded
differently, drift apart. Before that, one FlashMHF layer's output and gradients against the float64
reference at two shapes.

Prints a table of the loss at each logged step and the max relative difference (the check: <= 1%
at every logged step), the validation losses and the noise floor; exits non-zero on a failed check.
Writes compare_tiny_lm.json (or $TINY_LM_JSON) under $OUT when OUT is set. About a minute on an H200.
Arguments it does not know go to the example (e.g. --batch 32).

    PYTHONUNBUFFERED=1 python -m benchmarks.compare_tiny_lm [--steps 300] [--lr 1e-3] [--tol 0.01]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

import flashmhf_runtime as fm
from benchmarks.common import argument_parser
from flashmhf_runtime import reference

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"


def load_example() -> ModuleType:
    """examples/train_tiny_lm.py as a module (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("train_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b.double()).norm() / b.double().norm()).item()


def layer_check(device: str, tokens: int, tol: float, **shape) -> dict:
    """bf16 layer (params and input) vs float64 reference: output and every gradient."""
    torch.manual_seed(0)
    layer = fm.FlashMHF(**shape, device=device, dtype=torch.bfloat16)
    if layer.head_norm is not None:
        with torch.no_grad():
            layer.head_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(tokens, shape["d_model"], device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    y = layer(x)
    (y.float() * g.float()).sum().backward()
    p64 = {n: t.detach().double().requires_grad_() for n, t in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    y64 = reference.layer(
        x64, p64["w_in.weight"], p64["w_out.weight"], p64["k"], p64["u"], p64["v"], p64["router"],
        p64.get("head_norm.weight"),
    )  # fmt: skip
    (y64 * g.double()).sum().backward()
    errs = {"out": rel(y, y64), "dx": rel(x.grad, x64.grad)}
    errs.update({f"d{n}": rel(p.grad, p64[n].grad) for n, p in layer.named_parameters()})
    worst = max(errs.values())
    ok = errs["out"] <= 1e-2 and worst <= tol
    print(
        f"layer {shape} T={tokens}: "
        + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        + f"  {'OK' if ok else 'FAIL'}"
    )
    return {"shape": shape, "tokens": tokens, "rel_err": errs, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--tol", type=float, default=0.01, help="max relative loss difference, Triton vs reference")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="training precision of both runs (fp32: the kernels' ieee fp32 path)")
    ap.add_argument("--grad-tol", type=float, default=2e-2, help="layer gradients vs float64, bf16")
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="peak learning rate of both runs (at the example's 2e-3 two references that differ "
                         "only in rounding already drift ~1%% apart: docs/benchmarks/2026-11-29-tiny-lm.md)")
    ap.add_argument("--no-noise-floor", action="store_true",
                    help="skip the third run: the reference with its core in float64, which shows how far two "
                         "runs of the same maths, rounded differently, drift apart (the chaos of training itself)")
    opts, extra = ap.parse_known_args(argv)
    lm = load_example()
    dev = opts.device
    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(f"torch {torch.__version__}, {name}")

    checks = [
        layer_check(dev, 4096, opts.grad_tol, d_model=256, n_heads=4, d_ff=512, n_experts=4),
        layer_check(dev, 1000, opts.grad_tol, d_model=768, n_heads=8, d_ff=2048, n_experts=8, head_norm=True),
    ]

    base = ["--device", dev, "--dtype", opts.dtype, "--steps", str(opts.steps), "--seed", "0", "--lr", str(opts.lr),
            *extra]
    runs = {}
    variants = [("triton", []), ("reference", ["--reference"])]
    if not opts.no_noise_floor:
        variants.append(("reference_fp64", ["--reference", "--reference-precision", "fp64"]))
    for run_name, flag in variants:
        t0 = time.perf_counter()
        runs[run_name] = lm.main([*base, *flag, "--quiet"])
        took = time.perf_counter() - t0
        print(f"{run_name:9s}: {took:.1f}s wall ({runs[run_name]['time_s']:.1f}s training)", flush=True)

    tri, ref = runs["triton"], runs["reference"]
    print(f"\n{'step':>6} {'triton':>9} {'reference':>10} {'rel diff':>9}")
    rows = []
    for (step, a), (step_b, b) in zip(tri["losses"], ref["losses"]):
        assert step == step_b
        d = abs(a - b) / abs(b)
        rows.append({"step": step, "triton": a, "reference": b, "rel_diff": d})
        print(f"{step:6d} {a:9.4f} {b:10.4f} {d:9.2e}")
    val_diff = abs(tri["val_loss"] - ref["val_loss"]) / ref["val_loss"]
    print(f"{'val':>6} {tri['val_loss']:9.4f} {ref['val_loss']:10.4f} {val_diff:9.2e}")
    max_diff = max(r["rel_diff"] for r in rows)
    floor = None
    if "reference_fp64" in runs:
        ref64 = runs["reference_fp64"]
        drift = [abs(a - b) / abs(b) for (_, a), (_, b) in zip(ref64["losses"], ref["losses"])]
        floor = {"max_rel_diff": max(drift), "per_step": drift,
                 "val_rel_diff": abs(ref64["val_loss"] - ref["val_loss"]) / ref["val_loss"]}
        print(f"noise floor (reference fp64 vs fp32): max rel loss diff {floor['max_rel_diff']:.2e} "
              f"(" + " ".join(f"{d:.1e}" for d in drift) + f"), val {floor['val_rel_diff']:.2e}")
    first, last = rows[0], rows[-1]
    verdicts = {
        "layer output and gradients vs float64": all(c["ok"] for c in checks),
        "all losses finite": all(math.isfinite(r[k]) for r in rows for k in ("triton", "reference")),
        "step-0 loss ≈ ln 256 and equal (rel 1e-3)": abs(first["triton"] - math.log(256)) < 0.3
        and first["rel_diff"] <= 1e-3,
        f"max rel loss diff {max_diff:.2e} <= {opts.tol} at every logged step": max_diff <= opts.tol,
        "loss fell by > 1.0 nat (both)": last["triton"] < first["triton"] - 1.0
        and last["reference"] < first["reference"] - 1.0,
    }
    print()
    for what, ok in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        result = {"layer_checks": checks, "rows": rows, "max_rel_diff": max_diff, "val_rel_diff": val_diff,
                  "noise_floor": floor, "runs": runs, "verdicts": verdicts, "device": name,
                  "args": sys.argv[1:] if argv is None else argv}  # fmt: skip
        with open(os.path.join(out, os.environ.get("TINY_LM_JSON", "compare_tiny_lm.json")), "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
