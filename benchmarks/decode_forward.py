"""The layer's decode forward with its norm, router and core in one kernel against the two-step
path (the norm/router kernel, then the core's forward and, with a split d_ff, its reduction).

For each preset and token count: each path's output against float64, then, in alternating rounds
(the GPU host's speed drifts), the eager call's time (do_bench median, ms), its host time (µs per
call, calls back to back) and its CUDA-graph time, beside the SwiGLU FFN's eager time and host time.

    PYTHONUNBUFFERED=1 python -m benchmarks.decode_forward [--preset repo-1.3b ...] [--tokens 1,16,64]
"""

from __future__ import annotations

import statistics

import torch

import flashmhf_runtime as fm
from benchmarks.common import argument_parser, host_us
from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.layer import layer_error
from flashmhf.bench.timing import median_ms
from flashmhf_runtime import layer_op, op

PATHS = {"one kernel": set(), "two steps": {"norm_router_core", "router_core"}}  # path -> kinds disabled


def use_path(path: str) -> None:
    op.DISABLED_KINDS = set(PATHS[path])
    fm.reset()  # the fast paths keep the launchers they were given


def launched_kernels(layer: fm.FlashMHF, x: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def rows(preset: str, tokens: int, rounds: int) -> list[str]:
    layer = fm.FlashMHF.from_preset(preset, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, layer.d_model, device="cuda", dtype=torch.bfloat16)
    sw = swiglu_weights(layer.d_model, layer.d_ff, x.device, x.dtype)
    checks = {}
    for path in PATHS:
        use_path(path)
        for _ in range(3):
            error = layer_error(layer, x, None)  # the first calls set the fast path up; the last one runs on it
        checks[path] = (error, launched_kernels(layer, x))
    samples: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(rounds):
            samples.setdefault("SwiGLU eager ms", []).append(median_ms(lambda: swiglu(x, *sw)))
            samples.setdefault("SwiGLU host µs", []).append(host_us(lambda: swiglu(x, *sw), calls=100, repeats=5))
            for path in PATHS:
                use_path(path)
                layer(x)
                samples.setdefault(f"{path} eager ms", []).append(median_ms(lambda: layer(x)))
                samples.setdefault(f"{path} host µs", []).append(host_us(lambda: layer(x), calls=100, repeats=5))
                samples.setdefault(f"{path} graph ms", []).append(median_ms(lambda: layer(x), graph=True))
    use_path("one kernel")
    med = {name: statistics.median(v) for name, v in samples.items()}
    out = []
    for path, (error, kernels) in checks.items():
        eager, host, graph = med[f"{path} eager ms"], med[f"{path} host µs"], med[f"{path} graph ms"]
        out.append(f"| {preset} | {tokens} | {path} | {kernels} | {error:.1e} | {eager * 1e3:.1f} | {host:.1f} | "
                   f"{graph * 1e3:.1f} | {med['SwiGLU eager ms'] * 1e3:.1f} | {med['SwiGLU host µs']:.1f} | "
                   f"{eager / med['SwiGLU eager ms']:.2f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.decode_forward", __doc__)
    parser.add_argument("--preset", action="append", help="repeatable (default: repo-1.3b and paper-1.3b)")
    parser.add_argument("--tokens", default="1,16,64", help="comma list of token counts")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (medians over them)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print("| preset | T | path | kernels | error vs float64 | eager µs | host µs | graph µs | SwiGLU eager µs "
          "| SwiGLU host µs | eager / SwiGLU |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.preset or ["repo-1.3b", "paper-1.3b"]:
        for tokens in (int(t) for t in args.tokens.split(",")):
            for line in rows(preset, tokens, args.rounds):
                print(line, flush=True)
    print(f"\none-kernel kinds chosen without times up to {layer_op.FUSED_MAX_TOKENS} tokens")


if __name__ == "__main__":
    main()
