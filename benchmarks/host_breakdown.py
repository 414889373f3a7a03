"""Where a layer call's host time goes, piece by piece, on the GPU host.

Host µs per call of each piece, timed pipelined (calls back to back, no sync inside: the launch
queue absorbs them, so this is what the Python and launch side costs while the GPU keeps up), for
a decode forward (T = 1 and 64) and a training step (T = 1024). The training step's backward runs
on autograd's device thread: its body is timed there by a wrapper around ``_Layer.backward`` and
the same body is timed called from the main thread, and cProfile is run inside that thread (the
module-level profilers only see the main thread). The training step is measured three ways in the
same run (launches through Triton's launcher, replayed launches, and the backward's fast path on
top), each checked to give the first step's gradients bit for bit.

    PYTHONUNBUFFERED=1 python -m benchmarks.host_breakdown [--preset repo-1.3b ...] [--tokens 1024]
"""

from __future__ import annotations

import cProfile
import statistics
import time

import torch
import torch.nn.functional as F

import flashmhf_runtime as fm
from benchmarks.common import argument_parser, host_us
from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.host_profile import BackwardTimer, profile_table
from flashmhf.bench.layer import training_step
from flashmhf_runtime import layer_eager, layer_op, replay_launch
from flashmhf_runtime.reference import HEAD_NORM_EPS


def weights(layer) -> tuple:
    norm_w = None if layer.head_norm is None else layer.head_norm.weight.detach()
    return norm_w, *(w.detach() for w in (layer.router, layer.k, layer.u, layer.v))


def decode_us(fn) -> float:
    return host_us(fn, calls=100, repeats=9, warmup=10)


def decode_rows(layer, tokens: int) -> list[tuple[str, float]]:
    x = torch.randn(tokens, layer.d_model, device="cuda", dtype=torch.bfloat16)
    w_in, w_out = layer.w_in.weight.detach(), layer.w_out.weight.detach()
    norm_w, w_r, k, u, v = weights(layer)
    eps = HEAD_NORM_EPS if layer.head_norm is None else layer.head_norm.eps
    q = F.linear(x, w_in)
    sw = swiglu_weights(layer.d_model, layer.d_ff, x.device, x.dtype)
    with torch.no_grad():
        return [
            ("SwiGLU FFN", decode_us(lambda: swiglu(x, *sw))),
            ("layer (module call)", decode_us(lambda: layer(x))),
            ("layer_eager.layer", decode_us(lambda: layer_eager.layer(x, w_in, norm_w, w_r, k, u, v, w_out, eps))),
            ("F.linear W_in", decode_us(lambda: F.linear(x, w_in))),
            ("layer_core_forward", decode_us(lambda: layer_op.layer_core_forward(q, norm_w, w_r, k, u, v, eps))),
            ("torch.empty x3", decode_us(lambda: (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)))),
        ]


MODES = {  # name -> (replayed launches, the backward's fast path)
    "before (no replay, no fast backward)": (False, False),
    "replay": (True, False),
    "replay + fast backward": (True, True),
}


def set_mode(replay: bool, fast_backward: bool) -> None:
    replay_launch.ENABLED = replay
    layer_op._remember_backward = _REMEMBER if fast_backward else (lambda *a: None)
    fm.reset()  # launchers are bound again, with or without replay


_REMEMBER = layer_op._remember_backward


def timeline(layer, x, dy, steps: int = 30) -> dict[str, float]:
    """Median µs of a training step's parts: the forward, autograd until the backward body starts,
    the body (on autograd's thread), and autograd after it until grad returns."""
    parts: dict[str, list[float]] = {"forward": [], "to the backward": [], "backward body": [], "after it": []}
    with BackwardTimer() as timer:
        for _ in range(steps):
            t0 = time.perf_counter()
            y = layer(x)
            t1 = time.perf_counter()
            torch.autograd.grad(y, (x, *layer.parameters()), dy)
            t2 = time.perf_counter()
            b0, b1 = timer.spans[-1]
            for name, seconds in zip(parts, (t1 - t0, b0 - t1, b1 - b0, t2 - b1)):
                parts[name].append(seconds * 1e6)
        torch.cuda.synchronize()
    return {name: statistics.median(v) for name, v in parts.items()}


def training_rows(layer, tokens: int, rounds: int = 5) -> list[tuple[str, float]]:
    """Host µs of a training step in each mode and its timeline; the modes alternate within each of
    ``rounds`` rounds (the GPU host's speed drifts) and the table shows medians over rounds."""
    x = torch.randn(tokens, layer.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    sw = [t.requires_grad_() for t in swiglu_weights(layer.d_model, layer.d_ff, x.device, x.dtype)]
    reference = [g.clone() for g in training_step(layer, x, dy)]
    samples: dict[str, list[float]] = {}

    def add(name: str, us: float) -> None:
        samples.setdefault(name, []).append(us)

    for _ in range(rounds):
        add("SwiGLU FFN training step", host_us(lambda: torch.autograd.grad(swiglu(x, *sw), (x, *sw), dy),
                                                calls=20, repeats=3, warmup=10))
        for mode, (replay, fast_backward) in MODES.items():
            set_mode(replay, fast_backward)
            got = training_step(layer, x, dy)
            if not all(torch.equal(a, b) for a, b in zip(got, reference)):
                raise SystemExit(f"{mode}: gradients differ from the first step's")
            add(f"training step, {mode}", host_us(lambda: training_step(layer, x, dy), calls=20, repeats=3, warmup=10))
            for part, us in timeline(layer, x, dy, steps=10).items():
                add(f"  {part}, {mode}", us)
    return [(name, statistics.median(v)) for name, v in samples.items()]


def autograd_thread_profile(layer, tokens: int, top: int) -> str:
    x = torch.randn(tokens, layer.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    with BackwardTimer() as timer:
        training_step(layer, x, dy)
        timer.profiler = cProfile.Profile()
        for _ in range(30):
            training_step(layer, x, dy)
        torch.cuda.synchronize()
    return profile_table(timer.profiler, top)


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.host_breakdown", __doc__)
    parser.add_argument("--preset", action="append", help="repeatable (default: repo-1.3b and repo-370m)")
    parser.add_argument("--tokens", type=int, default=1024, help="token count of the training step")
    parser.add_argument("--top", type=int, default=30, help="functions listed from the autograd thread's profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print("| preset | T | piece | host µs per call |\n|---|---|---|---|")
    profiles = []
    for preset in args.preset or ["repo-1.3b", "repo-370m"]:
        layer = fm.FlashMHF.from_preset(preset, device="cuda", dtype=torch.bfloat16)
        for tokens in (1, 64):
            for name, us in decode_rows(layer, tokens):
                print(f"| {preset} | {tokens} | {name} | {us:.1f} |")
        for name, us in training_rows(layer, args.tokens):
            print(f"| {preset} | {args.tokens} | {name} | {us:.1f} |")
        profiles.append((preset, autograd_thread_profile(layer, args.tokens, args.top)))
    for preset, profile in profiles:
        print(f"\n--- {preset}: cProfile inside autograd's thread, 30 training steps (by own time)\n{profile}")


if __name__ == "__main__":
    main()
