"""Where the host time of a layer call goes: cProfile over repeated calls on the GPU.

    python -m flashmhf.bench.host_profile --preset repo-1.3b --tokens 1024 [--forward] [--calls 50]

Prints the host time per call (GPU idle before each call) and the functions with the most own time
(cProfile inflates Python calls, so read it for proportions, not absolute times). A training step's
backward runs on autograd's device thread, which a profiler enabled on the main thread does not
see: ``BackwardTimer`` times the layer's backward body there, and profiles it there when asked.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import flashmhf_runtime as fm
from flashmhf.bench.layer import training_step
from flashmhf.bench.timing import host_ms
from flashmhf_runtime import layer_eager


class BackwardTimer:
    """While entered, ``_Layer.backward`` (the eager layer's backward) records the start and end of
    each call's body on the thread it runs on, and runs under ``profiler`` once that is set."""

    def __init__(self):
        self.original = layer_eager._Layer.backward
        self.spans: list[tuple[float, float]] = []
        self.profiler: cProfile.Profile | None = None

    def __enter__(self) -> BackwardTimer:
        original = self.original

        def timed(ctx, dy):
            if self.profiler is not None:
                self.profiler.enable()
            start = time.perf_counter()
            try:
                return original(ctx, dy)
            finally:
                self.spans.append((start, time.perf_counter()))
                if self.profiler is not None:
                    self.profiler.disable()

        layer_eager._Layer.backward = staticmethod(timed)
        return self

    def __exit__(self, *exc) -> None:
        layer_eager._Layer.backward = staticmethod(self.original)


def profile_table(profiler: cProfile.Profile, top: int) -> str:
    """The ``top`` functions of ``profiler`` by own time."""
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


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
        calls = {"training step": lambda: training_step(layer, x, dy), "forward with autograd": lambda: layer(x)}
    for name, call in calls.items():
        for _ in range(3):
            call()
        print(f"{args.preset} T={args.tokens} {name}: host {host_ms(call) * 1e3:.0f} us per call")
    # One profiler at a time (from Python 3.12 cProfile is built on sys.monitoring: one tool at once).
    name = "forward" if args.forward else "forward with autograd"
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(args.calls):
        calls[name]()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"--- {name}: {args.calls} calls\n{profile_table(profiler, args.top)}")
    if not args.forward:
        with BackwardTimer() as timer:
            timer.profiler = cProfile.Profile()
            for _ in range(args.calls):
                calls["training step"]()
            torch.cuda.synchronize()
        body = sorted(end - start for start, end in timer.spans)[len(timer.spans) // 2]
        print(f"--- the layer's backward body on autograd's thread: {args.calls} training steps, median "
              f"{body * 1e6:.0f} us under the profiler\n{profile_table(timer.profiler, args.top)}")
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
