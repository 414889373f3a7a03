"""Compile every untuned default for GPU targets on this CPU and check spills and shared memory.

For each preset, architecture, dtype and role, the kind the runtime runs there (``flashmhf.codegen.
registry``) has the default config of every token bucket compiled with Triton's bundled ptxas (no GPU
needed). Roles that no kind runs on an architecture (the layer then uses PyTorch ops) are listed
with the reason. Ends with a summary per architecture and dtype; exits 1 if any default spills
registers or needs more shared memory than the target has.

    .venv/bin/python -m benchmarks.check_defaults
    .venv/bin/python -m benchmarks.check_defaults --preset repo-1.3b --arch sm_80,sm_89 --dtype bf16,fp32
    .venv/bin/python -m benchmarks.check_defaults --role norm_router,norm_router_bwd --tokens 1,16384
"""

from __future__ import annotations

import os
import sys
from collections import Counter

from rich.console import Console
from rich.table import Table

from benchmarks.common import argument_parser
from flashmhf.codegen import DTYPES, format_config, registry
from flashmhf.codegen.arch import ARCHS, CHECKED_ARCHS
from flashmhf.codegen.spec import kernel_dims
from flashmhf.tuner.defaults_check import (
    BUCKETS,
    DefaultReport,
    check_defaults,
    roles_without_kernel,
    runtime_specs,
)
from flashmhf_runtime.presets import get_preset

PRESETS = ("repo-128m", "paper-370m", "repo-1.3b", "paper-1.3b", "repo-370m")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse(argv: list[str] | None):
    ap = argument_parser(__spec__.name, __doc__)
    ap.add_argument("--preset", dest="presets", default=",".join(PRESETS), help="comma list of presets")
    ap.add_argument("--arch", dest="archs", default=",".join(a.name for a in CHECKED_ARCHS),
                    help=f"comma list of {', '.join(ARCHS)}")
    ap.add_argument("--dtype", dest="dtypes", default="bf16", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--role", dest="roles", default=",".join(r.name for r in registry.runtime_roles()),
                    help="comma list of roles (default: every role the runtime runs)")
    ap.add_argument("--tokens", default=",".join(map(str, BUCKETS)), help="comma list of token buckets")
    args = ap.parse_args(argv)
    for option, given, known in (("--arch", args.archs, ARCHS), ("--dtype", args.dtypes, DTYPES),
                                 ("--role", args.roles, [r.name for r in registry.runtime_roles()])):
        unknown = [x for x in _names(given) if x not in known]
        if unknown:
            ap.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    for name in _names(args.presets):
        try:
            get_preset(name)
        except ValueError as exc:
            ap.error(f"--preset: {exc}")
    try:
        args.buckets = tuple(int(t) for t in _names(args.tokens))
    except ValueError:
        ap.error(f"--tokens: expected a comma list of integers, got {args.tokens!r}")
    return args


def _summary(reports: list[DefaultReport], missing: Counter) -> Table:
    """Per architecture and dtype: defaults compiled, how many spill or exceed shared memory, and
    the roles no kind runs (per preset)."""
    table = Table("arch", "dtype", "defaults checked", "spill-free, fit", "spill", "over shared memory",
                  "roles without a kernel", title="summary")
    groups = sorted({(r.arch.name, r.spec.dtype) for r in reports} | set(missing), key=lambda g: (g[0], g[1]))
    for arch, dtype in groups:
        rs = [r for r in reports if (r.arch.name, r.spec.dtype) == (arch, dtype)]
        table.add_row(arch, dtype, str(len(rs)), str(sum(r.ok for r in rs)), str(sum(r.spill_bytes > 0 for r in rs)),
                      str(sum(r.shared_bytes > r.arch.smem_per_block for r in rs)), str(missing[(arch, dtype)]))
    return table


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # real compiles (read when a kernel module loads), not the interpreter
    roles = [registry.role(n) for n in _names(args.roles)]
    console = Console(width=max(140, Console().width))
    table = Table("arch", "spec", "T", "default config", "spills B", "shared KiB", "ok")
    reports: list[DefaultReport] = []
    missing: Counter = Counter()

    def show(r: DefaultReport) -> None:
        mark = "[green]ok[/]" if r.ok else "[red]NO[/]"
        table.add_row(r.arch.name, r.spec.label(), ",".join(map(str, r.buckets)), format_config(r.config),
                      str(r.spill_bytes), f"{r.shared_bytes // 1024} / {r.arch.smem_per_block // 1024}", mark)
        console.print(f"{r.arch.name} {r.spec.label()} T={','.join(map(str, r.buckets))}: spills {r.spill_bytes} B, "
                      f"shared {r.shared_bytes // 1024} KiB {'ok' if r.ok else 'FAILS'}")
        reports.append(r)

    for name in _names(args.presets):
        p = get_preset(name)
        d_h, d_e = kernel_dims(p.head_dim, p.expert_dim)
        shape = (p.n_heads, p.kv_heads, d_h, p.n_experts, d_e)
        for arch in (ARCHS[a] for a in _names(args.archs)):
            for dtype in _names(args.dtypes):
                for role, why in roles_without_kernel(shape, dtype, arch, args.buckets, roles):
                    missing[(arch.name, dtype)] += 1
                    console.print(f"{arch.name} {name} {dtype}: no {role.name} kernel ({why}); PyTorch runs it")
                check_defaults(runtime_specs(shape, dtype, arch, args.buckets, roles), [arch], args.buckets,
                               on_report=show)
    console.print(table)
    console.print(_summary(reports, missing))
    failed = [r for r in reports if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} of {len(reports)} default config(s) spill or exceed shared memory[/]")
        sys.exit(1)
    console.print(f"all {len(reports)} default configs compile without spills and within shared memory")


if __name__ == "__main__":
    main()
