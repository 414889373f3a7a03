"""Compile every untuned default for GPU targets on this CPU and check spills and shared memory.

For each preset, each architecture and each kind the runtime runs there, the default config of
every token bucket is compiled with Triton's bundled ptxas (no GPU needed). Exits 1 if any spills
registers or needs more shared memory than the target has.

    .venv/bin/python -m benchmarks.check_defaults
    .venv/bin/python -m benchmarks.check_defaults --preset repo-1.3b --arch sm_80,sm_89 --dtype bf16,fp32
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

from benchmarks.common import argument_parser
from flashmhf.codegen import format_config
from flashmhf.codegen.arch import ARCHS, CHECKED_ARCHS
from flashmhf.codegen.spec import kernel_dims
from flashmhf.tuner.defaults_check import BUCKETS, DefaultReport, check_defaults, runtime_specs
from flashmhf_runtime.presets import get_preset

PRESETS = ("repo-128m", "paper-370m", "repo-1.3b")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--preset", dest="presets", default=",".join(PRESETS), help="comma list of presets")
    ap.add_argument("--arch", dest="archs", default=",".join(a.name for a in CHECKED_ARCHS),
                    help=f"comma list of {', '.join(ARCHS)}")
    ap.add_argument("--dtype", dest="dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    ap.add_argument("--tokens", default=",".join(map(str, BUCKETS)), help="comma list of token buckets")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # real compiles (read when a kernel module loads), not the interpreter
    presets, archs, dtypes, tokens = args.presets, args.archs, args.dtypes, args.tokens
    unknown = [a for a in _names(archs) if a not in ARCHS]
    if unknown:
        ap.error(f"--arch: unknown arch {', '.join(unknown)} (known: {', '.join(ARCHS)})")
    buckets = tuple(int(t) for t in _names(tokens))
    console = Console(width=max(140, Console().width))
    table = Table("arch", "spec", "T", "default config", "spills B", "shared KiB", "ok")
    failed: list[DefaultReport] = []

    def show(r: DefaultReport) -> None:
        mark = "[green]ok[/]" if r.ok else "[red]NO[/]"
        table.add_row(r.arch.name, r.spec.label(), ",".join(map(str, r.buckets)), format_config(r.config),
                      str(r.spill_bytes), f"{r.shared_bytes // 1024} / {r.arch.smem_per_block // 1024}", mark)
        console.print(f"{r.arch.name} {r.spec.label()} T={','.join(map(str, r.buckets))}: spills {r.spill_bytes} B, "
                      f"shared {r.shared_bytes // 1024} KiB {'ok' if r.ok else 'FAILS'}")
        if not r.ok:
            failed.append(r)

    for name in _names(presets):
        p = get_preset(name)
        d_h, d_e = kernel_dims(p.head_dim, p.expert_dim)
        shape = (p.n_heads, p.kv_heads, d_h, p.n_experts, d_e)
        for arch in (ARCHS[a] for a in _names(archs)):
            for dtype in _names(dtypes):
                check_defaults(runtime_specs(shape, dtype, arch, buckets), [arch], buckets, on_report=show)
    console.print(table)
    if failed:
        console.print(f"[red]{len(failed)} default config(s) spill or exceed shared memory[/]")
        sys.exit(1)
    console.print("every default compiles without spills and within shared memory")


if __name__ == "__main__":
    main()
