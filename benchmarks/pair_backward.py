"""GPU: the two backward kernels run side by side on two streams — which schedule, and which pair of
configs, is fastest? (~1-2 min.)

Part 1 (schedules, the configs dispatch picks): serial; bwd_dkuv on a high-priority side stream with
bwd_dq on the current one (what the op does); the same without priority; and the kinds swapped.
Part 2 (pairs): every (bwd_dq config, bwd_dkuv config) of the lists below in the op's schedule,
against the same pair run serially. Every timed run's gradients must equal the serial run's exactly.

Configs as in benchmarks.check_backward: FLASHMHF_CACHE and the shipped caches, else the defaults.

    PYTHONUNBUFFERED=1 python -m benchmarks.pair_backward [--tokens 4096,16384]   # writes pair_backward.json to $OUT
"""

from __future__ import annotations

import functools
import json

import torch

from benchmarks import check_backward as cb
from benchmarks.common import argument_parser, out_dir

PRESET = "repo-1.3b"
DQ = [
    dict(block_m=64, block_f=32, num_warps=4, num_stages=3),
    dict(block_m=64, block_f=64, num_warps=4, num_stages=3),
    dict(block_m=128, block_f=64, num_warps=8, num_stages=2),
]
DKUV = [
    dict(block_f=64, block_m=16, num_warps=4, num_stages=3, split_dv=0, rows_major=0),
    dict(block_f=64, block_m=16, num_warps=4, num_stages=4, split_dv=0, rows_major=0),
    dict(block_f=128, block_m=16, num_warps=8, num_stages=4, split_dv=0, rows_major=0),
    dict(block_f=64, block_m=32, num_warps=4, num_stages=3, split_dv=1, rows_major=0),
]


def schedule(name: str, run_dq, run_dkuv, streams: dict) -> None:
    """Launch both kernels in one of the schedules; the current stream waits for both."""
    if name == "serial":
        run_dq()
        run_dkuv()
        return
    first, second = (run_dq, run_dkuv) if name == "dq on side stream" else (run_dkuv, run_dq)
    side = streams["low" if name == "dkuv on side stream, no priority" else "high"]
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        first()
    second()
    main.wait_stream(side)


def pair_case(tokens: int, dq_cfg: dict, dkuv_cfg: dict, schedules: list[str], streams: dict) -> list[dict]:
    shape = cb.shape_of(PRESET)
    q, k, u, v, r, ds = cb.make_inputs(shape, tokens, seed=7)
    flop = 11 * 2.0 * tokens * q.shape[1] * q.shape[2] * k.shape[1] * k.shape[2]  # 5 + 6 products
    if dkuv_cfg.get("split_dv"):
        flop *= 13 / 11

    def run(name: str, outs_dq, outs_dkuv) -> None:
        schedule(name,
                 lambda: cb.launch("bwd_dq", shape, dq_cfg, q, k, u, v, r, ds, outs_dq),
                 lambda: cb.launch("bwd_dkuv", shape, dkuv_cfg, q, k, u, v, r, ds, outs_dkuv), streams)

    want_dq, want_dkuv = cb.outputs("bwd_dq", q, k, r), cb.outputs("bwd_dkuv", q, k, r)
    run("serial", want_dq, want_dkuv)
    rows = []
    for name in schedules:
        got_dq, got_dkuv = cb.outputs("bwd_dq", q, k, r), cb.outputs("bwd_dkuv", q, k, r)  # NaN-poisoned
        run(name, got_dq, got_dkuv)
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip((*got_dq, *got_dkuv), (*want_dq, *want_dkuv)))
        ms = cb.median_ms(functools.partial(run, name, got_dq, got_dkuv))
        rows.append({"tokens": tokens, "schedule": name, "bwd_dq": dq_cfg, "bwd_dkuv": dkuv_cfg,
                     "identical": same, "ms": ms, "tflops_executed": flop / (ms * 1e-3) / 1e12})
        cb.log(f"T={tokens} {name:34s} dq {cb.row_config(dq_cfg)} | dkuv {cb.row_config(dkuv_cfg)}: "
               f"{ms:.3f} ms{'' if same else '  GRADIENTS DIFFER'}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--tokens", default="4096,16384", help="comma-separated token counts")
    args = ap.parse_args(argv)
    cb.isolate_configs()
    token_list = [int(t) for t in args.tokens.split(",")]
    shape = cb.shape_of(PRESET)
    streams = {"high": torch.cuda.Stream(priority=-1), "low": torch.cuda.Stream()}
    chosen = {t: (cb.chosen_config("bwd_dq", shape, t), cb.chosen_config("bwd_dkuv", shape, t)) for t in token_list}
    jobs = [("bwd_dq", shape, c, t) for t in token_list for c in (*DQ, chosen[t][0])]
    jobs += [("bwd_dkuv", shape, c, t) for t in token_list for c in (*DKUV, chosen[t][1])]
    errors = {key: err for key, err in cb.precompile(jobs).items() if err}
    if errors:
        cb.log(f"compile failures (skipped): {errors}")
    ok = lambda kind, c, t: cb.job_key(kind, shape, c, t) not in errors  # noqa: E731

    schedules = ["serial", "dkuv on side stream", "dkuv on side stream, no priority", "dq on side stream"]
    report = {"preset": PRESET, "device": torch.cuda.get_device_name(), "schedules": [], "pairs": []}
    for t in token_list:
        report["schedules"] += pair_case(t, *chosen[t], schedules, streams)
    for t in token_list:
        for dq_cfg in DQ:
            for dkuv_cfg in DKUV:
                if ok("bwd_dq", dq_cfg, t) and ok("bwd_dkuv", dkuv_cfg, t):
                    report["pairs"] += pair_case(t, dq_cfg, dkuv_cfg, ["serial", "dkuv on side stream"], streams)
        torch.cuda.empty_cache()

    (out_dir() / "pair_backward.json").write_text(json.dumps(report, indent=1))
    print(f"\n| T | schedule (configs dispatch picks, {PRESET}) | ms | identical |\n|---|---|---|---|")
    for x in report["schedules"]:
        print(f"| {x['tokens']} | {x['schedule']} | {x['ms']:.3f} | {x['identical']} |")
    print("\n| T | bwd_dq config | bwd_dkuv config | serial ms | side by side ms | identical |")
    print("|---|---|---|---|---|---|")
    pairs = report["pairs"]
    for a, b in zip(pairs[::2], pairs[1::2]):
        print(f"| {a['tokens']} | {cb.row_config(a['bwd_dq'])} | {cb.row_config(a['bwd_dkuv'])} | {a['ms']:.3f} | "
              f"{b['ms']:.3f} | {a['identical'] and b['identical']} |")


if __name__ == "__main__":
    main()
