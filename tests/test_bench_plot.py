"""`flashmhf bench --plot`: the chart is drawn from generic records (every `*_ms` column of a row is a
series), written as a PNG beside the report; the CLI path runs on CPU with the GPU parts stubbed."""

import json

import pytest
from click.testing import CliRunner
from matplotlib.image import imread  # the [plot] extra: scripts/setup.sh installs it

from flashmhf.bench.core import CoreRow
from flashmhf.bench.layer import LayerRow
from flashmhf.bench.plot import Record, plot_records, records_from_rows, series_label
from flashmhf.cli.app import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _core(tokens: int, ms: float) -> CoreRow:
    return CoreRow(tokens=tokens, backward=False, flashmhf_ms=ms, swiglu_ms=2 * ms, swiglu_compiled_ms=1.5 * ms,
                   flop=6.0 * tokens * 2048 * 5632, rel_err=1e-3, config="block_m=128", config_source="default")


def _layer(tokens: int, ms: float, compiled: float | None) -> LayerRow:
    return LayerRow(tokens=tokens, backward=False, flashmhf_ms=ms, swiglu_ms=ms / 2, swiglu_compiled_ms=ms / 3,
                    rel_err=1e-3, flashmhf_params=10, swiglu_params=8, flashmhf_compiled_ms=compiled)


def _check_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = imread(path).shape
    assert width > 1000 and height > 400  # two panels at 120 dpi


def test_every_timed_column_of_a_row_is_a_series_with_tflops_from_the_rows_flop():
    records = records_from_rows([_core(1024, 0.5).to_dict(), _core(16384, 4.0).to_dict()])
    names = {r.series for r in records}
    assert names == {"FlashMHF", "SwiGLU", "SwiGLU compiled"}
    fm_1024 = next(r for r in records if r.series == "FlashMHF" and r.tokens == 1024)
    assert fm_1024.ms == 0.5
    assert fm_1024.tflops == pytest.approx(6.0 * 1024 * 2048 * 5632 / 0.5e-3 / 1e12)


def test_rows_without_flop_give_time_only_and_unmeasured_columns_are_left_out():
    records = records_from_rows([_layer(64, 0.2, None).to_dict(), _layer(1024, 1.0, 0.8).to_dict()], "layer: ")
    assert all(r.tflops is None for r in records)
    compiled = [r for r in records if r.series == "layer: FlashMHF compiled"]
    assert [r.tokens for r in compiled] == [1024]  # None at T=64 (torch.compile failed): no point
    assert series_label("new_kernel_ms", "x: ") == "x: new kernel"


def test_bad_rows_are_errors_naming_the_column():
    with pytest.raises(ValueError, match="tokens"):
        records_from_rows([{"flashmhf_ms": 1.0}])
    with pytest.raises(ValueError, match="swiglu_ms"):
        records_from_rows([{"tokens": 64, "swiglu_ms": "fast"}])


def test_chart_is_a_png_with_every_series_in_the_time_panel_and_flop_series_in_the_tflops_panel(tmp_path):
    records = records_from_rows([_core(t, 0.001 * t).to_dict() for t in (1, 64, 1024)])
    records += [Record("layer: FlashMHF", t, 0.002 * t) for t in (64, 1024)]
    path = tmp_path / "chart.png"
    drawn = plot_records(records, path, "repo-1.3b bf16 forward")
    _check_png(path)
    assert drawn["time"] == ["FlashMHF", "SwiGLU", "SwiGLU compiled", "layer: FlashMHF"]
    assert drawn["tflops"] == ["FlashMHF", "SwiGLU", "SwiGLU compiled"]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_records([], tmp_path / "empty.png", "empty")


@pytest.fixture
def fake_gpu(monkeypatch):
    """bench on CPU: CUDA 'available' and the core/layer measurements replaced by fixed rows."""
    import torch

    import flashmhf.bench.core as core
    import flashmhf.bench.layer as layer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(core, "bench_core", lambda spec, d_ff, t, **kw: _core(t, 0.01 * t))
    monkeypatch.setattr(layer, "bench_layer", lambda module, t, **kw: _layer(t, 0.02 * t, 0.015 * t))
    monkeypatch.setattr("flashmhf.cli.bench_cmd._layer", lambda *a: None)


def test_bench_plot_writes_the_chart_beside_the_report_with_an_earlier_layer_run(fake_gpu, tmp_path):
    runner = CliRunner()
    layer_out = tmp_path / "layer.md"
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--tokens", "64,1024", "--layer",
                                  "--compile", "--out", str(layer_out)])
    assert result.exit_code == 0, result.output
    assert {r["bench"] for r in json.loads(layer_out.with_suffix(".json").read_text())} == {"layer"}
    out = tmp_path / "core.md"
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--tokens", "1,64,1024", "--compile",
                                  "--out", str(out), "--plot", "--plot-with", str(layer_out.with_suffix(".json"))])
    assert result.exit_code == 0, result.output
    assert "chart:" in result.output
    _check_png(out.with_suffix(".png"))
    assert out.read_text().startswith("# repo-128m bf16 forward on Test GPU")


def test_bench_plot_options_are_checked_before_measuring(fake_gpu, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--plot"])
    assert result.exit_code != 0 and "--out" in result.output
    report = tmp_path / "r.json"
    report.write_text(json.dumps([{"tokens": 64, "backward": True, "flashmhf_ms": 1.0}]))
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--plot-with", str(report)])
    assert result.exit_code != 0 and "--plot" in result.output
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--out", str(tmp_path / "x.md"), "--plot",
                                  "--plot-with", str(report)])
    assert result.exit_code != 0 and "not all forward" in result.output
    report.write_text("{}")
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--out", str(tmp_path / "x.md"), "--plot",
                                  "--plot-with", str(report)])
    assert result.exit_code != 0 and "expected the .json" in result.output
    assert not (tmp_path / "x.md").exists()  # nothing was measured
