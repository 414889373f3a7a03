"""Where a layer call's host time goes, piece by piece, on the GPU host.

Host µs per call of each piece, timed pipelined (calls back to back, no sync inside: the launch
queue absorbs them, so this is what the Python and launch side costs while the GPU keeps up), for
a decode forward (T = 1 and 64) and a training step (T = 1024). The training step's backward runs
on autograd's device thread: its body is timed there by a wrapper around ``_Layer.backward`` and
the same body is timed called from the main thread, and cProfile is run inside that thread (the
module-level profilers only see the main thread).

    PYTHONUNBUFFERED=1 python -m benchmarks.host_breakdown [--preset repo-1.3b] [--tokens 1024]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import flashmhf_runtime as fm
from benchmarks.common import argument_parser
from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.layer import training_step
from flashmhf_runtime import layer_eager, layer_op


def host_us(fn, calls: int = 100, repeats: int = 9) -> float:
    """Median over repeats of the mean host time per call of ``calls`` back-to-back calls."""
    for _ in range(10):
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


def weights(layer) -> tuple:
    norm_w = None if layer.head_norm is None else layer.head_norm.weight.detach()
    return norm_w, *(w.detach() for w in (layer.router, layer.k, layer.u, layer.v))


def decode_rows(layer, tokens: int) -> list[tuple[str, float]]:
    x = torch.randn(tokens, layer.d_model, device="cuda", dtype=torch.bfloat16)
    w_in, w_out = layer.w_in.weight.detach(), layer.w_out.weight.detach()
    norm_w, w_r, k, u, v = weights(layer)
    q = F.linear(x, w_in)
    sw = swiglu_weights(layer.d_model, layer.d_ff, x.device, x.dtype)
    with torch.no_grad():
        return [
            ("SwiGLU FFN", host_us(lambda: swiglu(x, *sw))),
            ("layer (module call)", host_us(lambda: layer(x))),
            ("layer_eager.layer", host_us(lambda: layer_eager.layer(x, w_in, norm_w, w_r, k, u, v, w_out, 1e-6))),
            ("F.linear W_in", host_us(lambda: F.linear(x, w_in))),
            ("layer_core_forward", host_us(lambda: layer_op.layer_core_forward(q, norm_w, w_r, k, u, v))),
            ("torch.empty x3", host_us(lambda: (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)))),
        ]


class BackwardTimer:
    """Wraps ``_Layer.backward``: times each call's body on the thread it runs on, optionally profiled."""

    def __init__(self):
        self.original = layer_eager._Layer.backward
        self.times: list[float] = []
        self.profiler: cProfile.Profile | None = None

    def __enter__(self):
        original = self.original

        def timed(ctx, dy):
            if self.profiler is not None:
                self.profiler.enable()
            t0 = time.perf_counter()
            out = original(ctx, dy)
            self.times.append(time.perf_counter() - t0)
            if self.profiler is not None:
                self.profiler.disable()
            return out

        layer_eager._Layer.backward = staticmethod(timed)
        return self

    def __exit__(self, *exc):
        layer_eager._Layer.backward = staticmethod(self.original)


def training_rows(layer, tokens: int, top: int) -> tuple[list[tuple[str, float]], str]:
    x = torch.randn(tokens, layer.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    norm_w, w_r, k, u, v = weights(layer)
    w_in, w_out = layer.w_in.weight.detach(), layer.w_out.weight.detach()
    q = F.linear(x, w_in).detach()
    s = layer_op.layer_core_forward(q, norm_w, w_r, k, u, v)
    sw = [t.requires_grad_() for t in swiglu_weights(layer.d_model, layer.d_ff, x.device, x.dtype)]
    # A stand-in for autograd's ctx: the body then runs on the main thread.
    ctx = SimpleNamespace(saved_tensors=(x.detach(), q, s, w_in, norm_w, w_r, k, u, v, w_out),
                          needs_input_grad=(True,) * 8 + (False,), eps=1e-6)
    rows = [
        ("SwiGLU FFN training step", host_us(lambda: torch.autograd.grad(swiglu(x, *sw), (x, *sw), dy), calls=30)),
        ("layer training step", host_us(lambda: training_step(layer, x, dy), calls=30)),
        ("layer forward with autograd", host_us(lambda: layer(x), calls=30)),
        ("_Layer.backward body, main thread", host_us(lambda: layer_eager._Layer.backward(ctx, dy), calls=30)),
        ("layer_core_backward, main thread", host_us(lambda: layer_op.layer_core_backward(q, norm_w, w_r, k, u, v, s),
                                                     calls=30)),
        ("4 x torch.mm (the projections' backward)", host_us(
            lambda: (torch.mm(dy, w_out), torch.mm(dy, w_in), torch.mm(dy.t(), x.detach()), torch.mm(dy.t(), s)),
            calls=30)),
    ]
    with BackwardTimer() as timer:
        host_us(lambda: training_step(layer, x, dy), calls=30)
        rows.append(("_Layer.backward body, autograd thread", statistics.median(timer.times) * 1e6))
        timer.profiler = cProfile.Profile()
        for _ in range(30):
            training_step(layer, x, dy)
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(timer.profiler, stream=text).sort_stats("tottime").print_stats(top)
    return rows, text.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.host_breakdown", __doc__)
    parser.add_argument("--preset", action="append", help="repeatable (default: repo-1.3b and paper-1.3b)")
    parser.add_argument("--tokens", type=int, default=1024, help="token count of the training step")
    parser.add_argument("--top", type=int, default=30, help="functions listed from the autograd thread's profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print("| preset | T | piece | host µs per call |\n|---|---|---|---|")
    profiles = []
    for preset in args.preset or ["repo-1.3b", "paper-1.3b"]:
        layer = fm.FlashMHF.from_preset(preset, device="cuda", dtype=torch.bfloat16)
        for tokens in (1, 64):
            for name, us in decode_rows(layer, tokens):
                print(f"| {preset} | {tokens} | {name} | {us:.1f} |")
        rows, profile = training_rows(layer, args.tokens, args.top)
        for name, us in rows:
            print(f"| {preset} | {args.tokens} | {name} | {us:.1f} |")
        profiles.append((preset, profile))
    for preset, profile in profiles:
        print(f"\n--- {preset}: cProfile inside autograd's thread, 30 training steps\n{profile}")


if __name__ == "__main__":
    main()
