"""`flashmhf bench`: the console table and the Markdown report share one column list; without a GPU
the command fails with one clear line."""

import dataclasses

from click.testing import CliRunner

from flashmhf.bench.core import CoreRow
from flashmhf.bench.layer import LayerRow
from flashmhf.cli.app import main
from flashmhf.cli.bench_cmd import _columns, _layer_columns


def _row(backward: bool) -> CoreRow:
    return CoreRow(tokens=16384, backward=backward, flashmhf_ms=12.3, swiglu_ms=5.6, swiglu_compiled_ms=5.4,
                   flop=1e13, rel_err=2.3e-3, config="block_m=128", config_source="shipped",
                   peak_mib=216.0 if backward else None, swiglu_peak_mib=1142.0 if backward else None,
                   backward_configs={"dq": "bwd_dq: block_m=64 (shipped)", "dkuv": "bwd_dkuv: block_f=64 (default)"}
                   if backward else None)


def test_backward_columns_carry_peak_memory_compiled_swiglu_and_every_kernels_config():
    columns = _columns(backward=True, compile_swiglu=True)
    cells = {name: cell(_row(True)) for name, cell in columns}
    assert cells["compiled SwiGLU ms"] == "5.4000"
    assert cells["peak MiB (SwiGLU)"] == "216 (1142)"
    assert cells["dq kernel (source)"] == "bwd_dq: block_m=64 (shipped)"
    assert cells["dkuv kernel (source)"] == "bwd_dkuv: block_f=64 (default)"
    assert cells["TFLOP/s"] == f"{1e13 / 12.3e-3 / 1e12:.0f}"


def test_forward_columns_leave_out_backward_only_cells():
    names = [name for name, _ in _columns(backward=False, compile_swiglu=False)]
    assert "peak MiB (SwiGLU)" not in names and "compiled SwiGLU ms" not in names
    assert not any(name.startswith("bwd_") for name in names)
    assert all(cell(_row(False)) for _, cell in _columns(backward=False, compile_swiglu=False))


def test_bench_without_a_gpu_is_one_clear_error():
    result = CliRunner().invoke(main, ["bench", "--preset", "repo-128m", "--tokens", "64"])
    assert result.exit_code != 0
    assert "CUDA GPU" in result.output and "Traceback" not in result.output


def _layer_row(backward: bool) -> LayerRow:
    return LayerRow(tokens=4096, backward=backward, flashmhf_ms=3.1, swiglu_ms=1.4, swiglu_compiled_ms=1.3,
                    rel_err=3e-3, flashmhf_params=43_000_000, swiglu_params=34_600_000,
                    flashmhf_peak_mib=300.0 if backward else None, swiglu_peak_mib=900.0 if backward else None,
                    swiglu_compiled_peak_mib=700.0 if backward else None, flashmhf_compiled_ms=2.9,
                    flashmhf_compiled_peak_mib=250.0 if backward else None,
                    flashmhf_graph_ms=None if backward else 2.0, swiglu_graph_ms=None if backward else 1.0,
                    flashmhf_host_ms=0.2, swiglu_host_ms=0.1)


def test_layer_columns_show_peak_memory_of_a_training_step_only():
    cells = {name: cell(_layer_row(True)) for name, cell in _layer_columns(backward=True, compile_swiglu=True)}
    assert cells["peak MiB FlashMHF"] == "300" and cells["peak MiB compiled SwiGLU"] == "700"
    assert cells["compiled FlashMHF layer ms"] == "2.9000" and cells["peak MiB compiled FlashMHF"] == "250"
    failed = dataclasses.replace(_layer_row(True), flashmhf_compiled_ms=None, flashmhf_compiled_peak_mib=None)
    cells = {name: cell(failed) for name, cell in _layer_columns(backward=True, compile_swiglu=True)}
    assert cells["compiled FlashMHF layer ms"] == "—" and cells["peak MiB compiled FlashMHF"] == "—"
    assert cells["params (M) FlashMHF / SwiGLU"] == "43.0 / 34.6"
    assert cells["CUDA graph"] == "—" and cells["ratio graph"] == "—"  # a step that could not be captured
    forward = [name for name, _ in _layer_columns(backward=False, compile_swiglu=False)]
    assert not any(name.startswith("peak") or name.startswith("compiled") for name in forward)
    assert {"CUDA graph", "SwiGLU CUDA graph", "host ms", "SwiGLU host ms", "ratio graph"} <= set(forward)
    no_graph = dataclasses.replace(_layer_row(False), flashmhf_graph_ms=None)
    assert dict((n, c(no_graph)) for n, c in _layer_columns(backward=False, compile_swiglu=False))["ratio graph"] == "—"
    assert all(cell(_layer_row(False)) for _, cell in _layer_columns(backward=False, compile_swiglu=False))


def test_bench_layer_without_a_gpu_is_one_clear_error():
    result = CliRunner().invoke(main, ["bench", "--preset", "repo-128m", "--tokens", "64", "--layer", "--backward"])
    assert result.exit_code != 0
    assert "CUDA GPU" in result.output and "Traceback" not in result.output
