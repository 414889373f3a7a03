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
                   "the core; with --backward, one training step and its peak memory")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write the table (Markdown) and a .json next to it")
@with_shape
def bench(shape: dict, dtype: str, tokens: str, backward: bool, compile_swiglu: bool, layer: bool,
          out_path: Path | None) -> None:
    """Time the FlashMHF core (tuned config if cached, else the default) next to SwiGLU of the same d_ff;
    with --layer, the whole FlashMHF layer next to a SwiGLU FFN.

    Times are medians of triton.testing.do_bench with the L2 flushed (CUDA-graph replay for the core's
    forward at T <= 64); every row is also checked against the float64 reference.
    """
    import torch

    if not torch.cuda.is_available():
        raise click.ClickException("bench times kernels on a CUDA GPU and none is visible "
                                   "(on CPU, `flashmhf tune` runs the pipeline under the interpreter)")
    from flashmhf.bench.core import bench_core
    from flashmhf.bench.layer import bench_layer
    from flashmhf.cli.tune_cmd import _int_list

    h, h_kv, d_h, e, d_e, label = shape_from_options(**shape)
    token_counts = _int_list(tokens, "--tokens")
    if layer:
        module = _layer(shape, h, h_kv, d_h, e, d_e, dtype)
        rows = [bench_layer(module, t, backward=backward, compile_models=compile_swiglu) for t in token_counts]
        columns = _layer_columns(backward, compile_swiglu)
    else:
        spec = Spec("fwd", h, h_kv, d_h, e, d_e, dtype)
        rows = [bench_core(spec, e * d_e, t, backward=backward, compile_swiglu=compile_swiglu) for t in token_counts]
        columns = _columns(backward, compile_swiglu)
    what = ("layer " if layer else "") + ("forward+backward" if backward else "forward")
    title = f"{label} {dtype} {what} on {torch.cuda.get_device_name()}"
    table = Table(*(name for name, _ in columns), title=title)
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    Console(width=160).print(table)
    if out_path:
        lines = [f"# {title}", "", "| " + " | ".join(name for name, _ in columns) + " |",
                 "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
        out_path.write_text("\n".join(lines) + "\n")
        out_path.with_suffix(".json").write_text(json.dumps([r.to_dict() for r in rows], indent=1))


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
        ("SwiGLU FFN ms", lambda r: f"{r.swiglu_ms:.4f}"),
    ]
    if compile_swiglu:
        columns.insert(2, ("compiled FlashMHF layer ms", lambda r: _maybe(r.flashmhf_compiled_ms, ".4f")))
        columns.append(("compiled SwiGLU ms", lambda r: f"{r.swiglu_compiled_ms:.4f}"))
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


def _maybe(value: float | None, fmt: str) -> str:
    """A measured value, or a dash where it could not be measured (e.g. torch.compile failed)."""
    return "—" if value is None else format(value, fmt)
