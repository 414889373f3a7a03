"""Where the host time of a layer call goes: cProfile over repeated calls on the GPU.

    python -m flashmhf.bench.host_profile --preset repo-1.3b --tokens 1024 [--forward] [--calls 50]

Prints the host time per call (GPU idle before each call) and the functions with the most own time
(cProfile inflates Python calls, so read it for proportions, not absolute times).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import flashmhf_runtime as fm
from flashmhf.bench.layer import training_step
from flashmhf.bench.timing import host_ms
from flashmhf_runtime import layer_op


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="repo-1.3b", choices=sorted(fm.PRESETS))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--forward", action="store_true", help="an inference forward instead of a training step")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    layer = fm.FlashMHF.from_preset(args.preset, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(args.tokens, layer.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=not args.forward)
    dy = torch.randn_like(x)
    if args.forward:
        calls = {"forward": torch.no_grad()(lambda: layer(x))}
    else:
        # The backward runs on autograd's device thread, which cProfile does not see: its op is
        # also profiled on its own, called directly.
        norm_w = None if layer.head_norm is None else layer.head_norm.weight
        q = layer.w_in(x).detach()
        weights = [w.detach() for w in (layer.router, layer.k, layer.u, layer.v)]
        norm = None if norm_w is None else norm_w.detach()
        calls = {
            "training step": lambda: training_step(layer, x, dy),
            "forward with autograd": lambda: layer(x),
            "backward op (layer_core_backward)": lambda: layer_op.layer_core_backward(q, norm, *weights, dy),
        }
    for name, call in calls.items():
        for _ in range(3):
            call()
        print(f"{args.preset} T={args.tokens} {name}: host {host_ms(call) * 1e3:.0f} us per call")
    for name, call in list(calls.items())[-2:] if not args.forward else calls.items():
        profiler = cProfile.Profile()
        torch.cuda.synchronize()
        profiler.enable()
        for _ in range(args.calls):
            call()
        profiler.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"--- {name}: {args.calls} calls\n{out.getvalue()}")
    # torch.profiler sees every thread (autograd's included): CPU time per op and autograd node.
    from torch.profiler import ProfilerActivity, profile

    first = next(iter(calls.values()))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            first()
        torch.cuda.synchronize()
    print(f"--- torch.profiler, {next(iter(calls))}: {args.calls} calls")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.top))

if __name__ == "__main__":
    main()
