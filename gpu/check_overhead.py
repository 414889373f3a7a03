"""Issue 4 on the GPU: after `flashmhf tune`, a model call uses the tuned config (debug log), and the
per-call host overhead of fm.flash_mhf at T = 1 against a bare Triton launch of the same kernels.

    FLASHMHF_CACHE=tuned.sqlite PYTHONUNBUFFERED=1 python3 gpu/check_overhead.py [--preset repo-1.3b]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("FLASHMHF_KERNEL_DIR", "/tmp/flashmhf-kernels")

import torch  # noqa: E402
import triton  # noqa: E402

import flashmhf_runtime as fm  # noqa: E402
from flashmhf.checks import core_inputs  # noqa: E402
from flashmhf.codegen import Spec, load  # noqa: E402
from flashmhf_runtime import dispatch  # noqa: E402


def host_us(fn, calls: int = 200, repeats: int = 30) -> float:
    """Median host time per call: `calls` launches back to back, no sync inside (the launch queue
    absorbs them), synchronised between repeats."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def bare_launcher(spec: Spec, config: dict, q, k, u, v, r, out):
    """The same kernels launched straight through Triton, every argument precomputed."""
    mod = load(spec)
    n_tokens = q.shape[0]
    n_rows, split = n_tokens * spec.group, config["split"]
    n_elems = n_tokens * spec.n_heads * spec.head_dim
    grid = (triton.cdiv(n_rows, config["block_m"]), spec.n_kv_heads, split)
    dst = out if split == 1 else torch.empty((split, *q.shape), device=q.device, dtype=torch.float32)
    consts = dict(BLOCK_M=config["block_m"], BLOCK_F=config["block_f"], SPLIT=split,
                  TILES_PER_SPLIT=triton.cdiv(spec.d_ff // config["block_f"], split),
                  num_warps=config["num_warps"], num_stages=config["num_stages"])
    args = (q, k, u, v, r, dst, n_rows, q.stride(0), q.stride(1), r.stride(0), r.stride(1), n_elems)
    reduce_grid = (triton.cdiv(n_elems, mod.REDUCE_BLOCK),)

    def launch():
        mod.flashmhf_fwd[grid](*args, **consts)
        if split > 1:
            mod.flashmhf_fwd_reduce[reduce_grid](dst, out, n_elems, SPLIT=split, BLOCK=mod.REDUCE_BLOCK, num_warps=4)

    return launch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="repo-1.3b")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flashmhf.dispatch").setLevel(logging.DEBUG)
    p = fm.PRESETS[args.preset]
    spec = Spec("fwd", p.n_heads, p.kv_heads, p.head_dim, p.n_experts, p.expert_dim, "bf16")
    report = {"cache": os.environ.get("FLASHMHF_CACHE")}
    q, k, u, v, r = core_inputs(spec, 1, torch.bfloat16, "cuda", seed=0)
    fm.flash_mhf(q, k, u, v, r)  # first call: lookup (logged), compile
    config, source = dispatch.chosen_config(spec, 1, torch.cuda.current_device())
    report.update(config=config, source=source)
    print(f"T=1 uses {config} from {source}", flush=True)
    out = torch.empty_like(q)
    bare = bare_launcher(spec, config, q, k, u, v, r, out)
    ours = lambda: fm.flash_mhf(q, k, u, v, r)  # noqa: E731
    empty = lambda: torch.empty_like(q)  # noqa: E731
    rounds = [(host_us(bare), host_us(ours), host_us(empty)) for _ in range(3)]
    report["bare_us"] = [b for b, _, _ in rounds]
    report["flash_mhf_us"] = [o for _, o, _ in rounds]
    report["empty_like_us"] = [e for _, _, e in rounds]
    bare_us, ours_us = statistics.median(report["bare_us"]), statistics.median(report["flash_mhf_us"])
    report["overhead_us"] = ours_us - bare_us
    print(f"host time per call at T=1: bare Triton launch {bare_us:.2f} us, fm.flash_mhf {ours_us:.2f} us "
          f"(+{ours_us - bare_us:.2f} us, of which torch.empty_like ~{statistics.median(report['empty_like_us']):.2f})")
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "overhead.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
