"""`flashmhf doctor`: GPU, versions, cache files in effect, and what is tuned for this GPU."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections import defaultdict
from importlib import metadata

import click
from rich.table import Table

from flashmhf.cache.device import device_arch, device_info, interpreting
from flashmhf.cache.summary import TunedEntry, files_report, tuned_entries
from flashmhf.cli.output import add_row, data_console, data_table, files_table


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi (torch does not report it); '?' if unavailable."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "?"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        return out.splitlines()[0].strip() if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _gpu_lines() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["no GPU: kernels run under the Triton interpreter (TRITON_INTERPRET=1) / the PyTorch reference"]
    lines = [f"driver {_driver_version()}, CUDA runtime {torch.version.cuda}"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, "
                     f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    if interpreting():
        lines.append("TRITON_INTERPRET=1: kernels run under the Triton interpreter, not on the GPU")
    return lines


def _arch_line() -> str:
    """The architecture defaults and kinds are chosen for, and which kind runs each role (repo-1.3b):
    the runtime's own choice, tuned times included."""
    import torch

    from flashmhf.codegen import registry
    from flashmhf.codegen.arch import FEATURES
    from flashmhf_runtime import op
    from flashmhf_runtime.presets import get_preset

    arch = device_arch()
    features = ", ".join(FEATURES[f] for f in sorted(arch.features)) or "none of wgmma, TMA, Gluon"
    p = get_preset("repo-1.3b")
    shape_key = op.kernel_shape_key(*p.shape, "bf16")
    device = torch.device("cpu") if arch.is_interpreter else torch.device("cuda", torch.cuda.current_device())
    kinds = ", ".join(f"{role.name} {op.kind_for(role, shape_key, 16384, device)}" for role in registry.runtime_roles())
    return (f"architecture: {arch.label()}, {arch.smem_per_block // 1024} KiB shared memory per block, "
            f"{arch.sm_count} SMs, MMA v{arch.mma}, {features}{'' if arch.checked else ' (row on paper)'}; "
            f"repo-1.3b bf16 at 16384 tokens runs {kinds}")


def _buckets(entries: list[TunedEntry]) -> str:
    return " ".join(str(b) for b in sorted({e.key.bucket for e in entries})) or "-"


def _tuned_table(entries: list[TunedEntry]) -> Table:
    from flashmhf_runtime.presets import PRESETS

    by_shape: dict[tuple, list[TunedEntry]] = defaultdict(list)
    for e in entries:
        by_shape[e.key.spec.as_tuple()[1:6]].append(e)
    table = data_table("shape", "kind", "dtype", "tuned token buckets", "other template (unused) or Triton (fallback)",
                       title="tuned for this device (first: installed template and running Triton; results of "
                             "another Triton are used where the running one has none)")
    rows: list[tuple[str, list[TunedEntry]]] = []
    named = set()
    for p in PRESETS.values():
        shape = p.shape
        named.add(shape)
        rows.append((p.name, by_shape.get(shape, [])))
    for shape, es in sorted(by_shape.items()):
        if shape not in named:
            h, h_kv, d_h, e, d_e = shape
            rows.append((f"H{h}/{h_kv} d_h{d_h} E{e}x{d_e}", es))
    for label, es in rows:
        if not es:
            add_row(table, label, "-", "-", "nothing tuned", "")
            continue
        groups: dict[tuple[str, str], list[TunedEntry]] = defaultdict(list)
        for e in es:
            groups[(e.key.spec.kind, e.key.spec.dtype)].append(e)
        for (kind, dtype), ge in sorted(groups.items()):
            usable = [e for e in ge if e.stale is None]
            stale = [e for e in ge if e.stale is not None]
            reasons = sorted({e.stale for e in stale if e.stale})
            add_row(table, label, kind, dtype, _buckets(usable),
                    (_buckets(stale) + f" ({'; '.join(reasons)})") if stale else "")
            label = ""
    return table


@click.command()
def doctor() -> None:
    """Show the GPU, versions, the cache files in effect and what is tuned for this GPU."""
    console = data_console()
    optuna = _version("optuna")
    versions = data_table("component", "version", title="versions")
    versions.show_header = False
    for name, value in (
        ("flashmhf", _version("flashmhf") or "source tree"),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", _version("torch") or "not installed"),
        ("triton", _version("triton") or "not installed"),
        ("optuna", optuna or "not installed (needed by `flashmhf tune`: pip install 'flashmhf[tune]')"),
        ("sqlite", __import__("sqlite3").sqlite_version),
    ):
        add_row(versions, name, value)
    console.print(versions)
    for line in _gpu_lines():
        click.echo(line)
    dev = device_info()
    click.echo(f"lookup device: {dev.name} (compute capability {dev.capability}), Triton {dev.triton_version}")
    click.echo(_arch_line())

    console.print(files_table(files_report()))

    entries = tuned_entries(dev)
    console.print(_tuned_table(entries))
    if not any(e.stale is None for e in entries):
        click.echo("nothing usable is tuned for this device: kernels use safe defaults. Tune with e.g. "
                   "`flashmhf tune --preset repo-1.3b`.")
