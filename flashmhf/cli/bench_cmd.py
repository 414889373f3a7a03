"""`flashmhf bench`: the core op next to cuBLAS SwiGLU on this GPU, as a table and a report file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from flashmhf.bench.core import BACKWARD_ROLES, CoreRow
from flashmhf.bench.layer import LayerRow
from flashmhf.bench.plot import PlotUnavailable, chart_name, plot_runs, require_matplotlib
from flashmhf.bench.results import Run, direction, read_run, report_title, tag_rows
from flashmhf.cli.spec_options import dtype_option, shape_from_options, shape_options, with_shape
from flashmhf.codegen import Spec


@click.command()
@shape_options
@dtype_option()
@click.option("--tokens", default="1,64,1024,16384", show_default=True, help="comma list of token counts")
@click.option("--backward", is_flag=True, help="time forward+backward (training) instead of forward")
@click.option("--compile", "compile_swiglu", is_flag=True,
              help="also time torch.compile'd SwiGLU (with --layer, also the compiled FlashMHF layer)")
@click.option("--layer", is_flag=True,
              help="time the whole layer (W_in, head RMSNorm as in the preset, router, core, W_out) instead of "
                   "the core, eager, as a CUDA graph (forward) and with the host time of a call; with "
                   "--backward, one training step and its peak memory")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write the table (Markdown) and a .json next to it: the rows, each naming its shape, dtype "
                   "and GPU (what charts are drawn from)")
@click.option("--plot", is_flag=True,
              help="with --out, also a chart next to the report, <shape>-<dtype>-<direction>.png: time and "
                   "TFLOP/s against tokens, one line per timed column but host times (needs matplotlib: pip install "
                   "'flashmhf[plot]'). Charts of saved results, without a GPU: python -m flashmhf.bench.plot "
                   "REPORT.json ...")
@click.option("--plot-with", "plot_with", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="with --plot, also draw the rows of an earlier bench report of the same shape, dtype and "
                   "direction (its .json; e.g. the --layer run of this preset); repeatable")
@with_shape
def bench(shape: dict, dtype: str, tokens: str, backward: bool, compile_swiglu: bool, layer: bool,
          out_path: Path | None, plot: bool, plot_with: tuple[Path, ...]) -> None:
    """Time the FlashMHF core (tuned config if cached, else the default) next to SwiGLU of the same d_ff;
    with --layer, the whole FlashMHF layer next to a SwiGLU FFN.

    Times are medians of triton.testing.do_bench with the L2 flushed (CUDA-graph replay for the core's
    forward at T <= 64); FlashMHF and SwiGLU are timed in alternation, three rounds each, and each
    side's median round is reported. Every row is also checked against the float64 reference.
    """
    import torch

    h, h_kv, d_h, e, d_e, label = shape_from_options(**shape)
    # Bad plot options fail before minutes of measuring, not after.
    earlier = _plot_inputs(plot, plot_with, out_path, (label, dtype, backward))
    if not torch.cuda.is_available():
        redraw = "; charts of saved results: python -m flashmhf.bench.plot REPORT.json" if plot else ""
        raise click.ClickException("bench times kernels on a CUDA GPU and none is visible (on CPU, `flashmhf tune` "
                                   f"runs the pipeline under the interpreter{redraw})")
    from flashmhf.bench.core import bench_core
    from flashmhf.bench.layer import bench_layer
    from flashmhf.cli.tune_cmd import _int_list

    token_counts = _int_list(tokens, "--tokens")
    if layer:
        module = _layer(shape, h, h_kv, d_h, e, d_e, dtype)
        rows = [bench_layer(module, t, backward=backward, compile_models=compile_swiglu) for t in token_counts]
        columns = _layer_columns(backward, compile_swiglu)
    else:
        spec = Spec("fwd", h, h_kv, d_h, e, d_e, dtype)
        rows = [bench_core(spec, e * d_e, t, backward=backward, compile_swiglu=compile_swiglu) for t in token_counts]
        columns = _columns(backward, compile_swiglu)
    device = torch.cuda.get_device_name()
    title = report_title(label, dtype, backward, device, layer=layer)
    table = Table(*(name for name, _ in columns), title=title)
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    Console(width=160).print(table)
    if not out_path:
        return
    lines = [f"# {title}", "", "| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    out_path.write_text("\n".join(lines) + "\n")
    bench_kind = "layer" if layer else "core"
    result = tag_rows([r.to_dict() for r in rows], bench_kind, label, dtype, device)
    out_path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if plot:
        run = Run(out_path.stem, bench_kind, label, dtype, backward, device, tuple(result))
        chart = out_path.parent / chart_name(run)
        plot_runs([run, *earlier], chart)
        click.echo(f"chart: {chart}")


def _plot_inputs(plot: bool, plot_with: tuple[Path, ...], out_path: Path | None,
                 chart_key: tuple[str, str, bool]) -> list[Run]:
    """Check the plot options and read the --plot-with reports: runs of this run's chart."""
    if not plot:
        if plot_with:
            raise click.UsageError("--plot-with adds rows to the chart of --plot: give --plot too")
        return []
    if out_path is None:
        raise click.UsageError("--plot writes the chart next to the report: give --out REPORT.md")
    try:
        require_matplotlib()
    except PlotUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    runs = []
    for path in plot_with:
        try:
            run = read_run(path)
        except ValueError as exc:
            raise click.UsageError(f"--plot-with {exc}") from None
        if run.chart_key != chart_key:
            raise click.UsageError(
                f"--plot-with {path}: it measured {_measured(*run.chart_key)}, this run {_measured(*chart_key)}; "
                "one chart shows one (python -m flashmhf.bench.plot draws a chart for each)")
        runs.append(run)
    return runs


def _measured(shape: str, dtype: str, backward: bool) -> str:
    return f"{shape} {dtype} {direction(backward)}"


def _columns(backward: bool, compile_swiglu: bool) -> list[tuple[str, Callable[[CoreRow], str]]]:
    """(header, cell) of each column: one list for the console table and the Markdown file."""
    columns: list[tuple[str, Callable[[CoreRow], str]]] = [
        ("T", lambda r: str(r.tokens)),
        ("FlashMHF ms", lambda r: f"{r.flashmhf_ms:.4f}"),
        ("TFLOP/s", lambda r: f"{r.flashmhf_tflops:.0f}"),
        ("SwiGLU ms", lambda r: f"{r.swiglu_ms:.4f}"),
        ("SwiGLU TFLOP/s", lambda r: f"{r.swiglu_tflops:.0f}"),
    ]
    if compile_swiglu:
        columns.append(("compiled SwiGLU ms", lambda r: f"{r.swiglu_compiled_ms:.4f}"))
    if backward:
        columns.append(("peak MiB (SwiGLU)", lambda r: f"{r.peak_mib:.0f} ({r.swiglu_peak_mib:.0f})"))
    columns.append(("rel err", lambda r: f"{r.rel_err:.1e}"))
    columns.append(("fwd config (source)", lambda r: f"{r.config} ({r.config_source})"))
    if backward:
        for role in BACKWARD_ROLES:
            columns.append((f"{role} kernel (source)", lambda r, role=role: r.backward_configs[role]))
    return columns


def _layer(shape: dict, h: int, h_kv: int, d_h: int, e: int, d_e: int, dtype: str):
    """The FlashMHF layer of this shape on the GPU: the preset's head RMSNorm, else none."""
    import torch

    import flashmhf_runtime as fm
    from flashmhf.checks import TORCH_DTYPES

    head_norm = fm.get_preset(shape["preset"]).head_norm if shape.get("preset") else False
    torch.manual_seed(0)
    return fm.FlashMHF(h * d_h, h, e * d_e, e, n_kv_heads=h_kv, head_norm=head_norm, device="cuda",
                       dtype=TORCH_DTYPES[dtype])


def _layer_columns(backward: bool, compile_swiglu: bool) -> list[tuple[str, Callable[[LayerRow], str]]]:
    """(header, cell) of each column of the --layer table."""
    columns: list[tuple[str, Callable[[LayerRow], str]]] = [
        ("T", lambda r: str(r.tokens)),
        ("FlashMHF layer ms", lambda r: f"{r.flashmhf_ms:.4f}"),
    ]
    columns.append(("CUDA graph", lambda r: _maybe(r.flashmhf_graph_ms, ".4f")))
    if compile_swiglu:
        columns.append(("compiled FlashMHF layer ms", lambda r: _maybe(r.flashmhf_compiled_ms, ".4f")))
    columns.append(("host ms", lambda r: _maybe(r.flashmhf_host_ms, ".4f")))
    columns.append(("SwiGLU FFN ms", lambda r: f"{r.swiglu_ms:.4f}"))
    columns.append(("SwiGLU CUDA graph", lambda r: _maybe(r.swiglu_graph_ms, ".4f")))
    if compile_swiglu:
        columns.append(("SwiGLU compiled", lambda r: f"{r.swiglu_compiled_ms:.4f}"))
    columns.append(("SwiGLU host ms", lambda r: _maybe(r.swiglu_host_ms, ".4f")))
    columns.append(("ratio eager", lambda r: f"{r.flashmhf_ms / r.swiglu_ms:.2f}"))
    columns.append(("ratio graph", lambda r: _ratio(r.flashmhf_graph_ms, r.swiglu_graph_ms)))
    if backward:
        columns.append(("peak MiB FlashMHF", lambda r: f"{r.flashmhf_peak_mib:.0f}"))
        if compile_swiglu:
            columns.append(("peak MiB compiled FlashMHF", lambda r: _maybe(r.flashmhf_compiled_peak_mib, ".0f")))
        columns.append(("peak MiB SwiGLU", lambda r: f"{r.swiglu_peak_mib:.0f}"))
        if compile_swiglu:
            columns.append(("peak MiB compiled SwiGLU", lambda r: f"{r.swiglu_compiled_peak_mib:.0f}"))
    columns.append(("params (M) FlashMHF / SwiGLU",
                    lambda r: f"{r.flashmhf_params / 1e6:.1f} / {r.swiglu_params / 1e6:.1f}"))
    columns.append(("rel err", lambda r: f"{r.rel_err:.1e}"))
    return columns


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


def _maybe(value: float | None, fmt: str) -> str:
    """A measured value, or a dash where it could not be measured (e.g. torch.compile failed)."""
    return "—" if value is None else format(value, fmt)
