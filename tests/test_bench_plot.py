"""Charts of bench results: drawn from the rows of `flashmhf bench --out` (every `*_ms` column of a row
is a series), one PNG per shape, dtype and direction, by `bench --plot` (GPU parts stubbed here) or
from saved files by `python -m flashmhf.bench.plot` on any machine."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.image import imread  # the [plot] extra, in the dev extra

from flashmhf.bench import plot
from flashmhf.bench.core import CoreRow
from flashmhf.bench.layer import LayerRow
from flashmhf.bench.plot import Record, chart_name, draw_charts, plot_records, plot_runs, records_from_rows
from flashmhf.bench.results import Run, read_run, report_title, tag_rows
from flashmhf.bench.timing import ffn_flop
from flashmhf.cli.app import main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
D_MODEL, D_FF = 2048, 5632


def _core(tokens: int, ms: float, backward: bool = False) -> CoreRow:
    trained = {"peak_mib": 100.0, "swiglu_peak_mib": 300.0, "backward_configs": {"dq": "x", "dkuv": "y"}}
    return CoreRow(tokens=tokens, backward=backward, flashmhf_ms=ms, swiglu_ms=2 * ms, swiglu_compiled_ms=1.5 * ms,
                   flop=ffn_flop(tokens, 3 * D_MODEL * D_FF, backward), rel_err=1e-3, config="block_m=128",
                   config_source="default", **(trained if backward else {}))


def _layer(tokens: int, ms: float, compiled: float | None, backward: bool = False) -> LayerRow:
    return LayerRow(tokens=tokens, backward=backward, flashmhf_ms=ms, swiglu_ms=ms / 2, swiglu_compiled_ms=ms / 3,
                    rel_err=1e-3, flashmhf_params=10, swiglu_params=3 * D_MODEL * D_FF, flashmhf_compiled_ms=compiled,
                    flashmhf_graph_ms=ms / 1.5, swiglu_graph_ms=ms / 2.5, flashmhf_host_ms=0.1, swiglu_host_ms=0.05,
                    flop=ffn_flop(tokens, 3 * D_MODEL * D_FF, backward),
                    **({"flashmhf_peak_mib": 50.0, "swiglu_peak_mib": 90.0, "swiglu_compiled_peak_mib": 80.0}
                       if backward else {}))


def _run(bench: str, rows: list, shape: str = "repo-128m", source: str | None = None) -> Run:
    tagged = tag_rows([r.to_dict() for r in rows], bench, shape, "bf16", "Test GPU")
    return Run(source or bench, bench, shape, "bf16", rows[0].backward, "Test GPU", tuple(tagged))


def _write_run(path: Path, run: Run) -> Path:
    path.write_text(json.dumps(list(run.rows)))
    return path


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = imread(path).shape
    assert width > 1000 and height > 500  # two panels and the legend at 100 dpi


# ------------------------------------------------------------------------------------ records


def test_ffn_flop_is_a_swiglu_ffn_of_the_same_d_ff():
    assert ffn_flop(1024, 3 * D_MODEL * D_FF, False) == 6.0 * 1024 * D_MODEL * D_FF
    assert ffn_flop(1024, 3 * D_MODEL * D_FF, True) == 3 * 6.0 * 1024 * D_MODEL * D_FF


def test_every_timed_column_of_a_row_is_a_series_with_tflops_from_the_rows_flop():
    records = records_from_rows([_core(1024, 0.5).to_dict(), _core(16384, 4.0).to_dict()], "core")
    assert {r.series for r in records} == {"core: FlashMHF", "core: SwiGLU", "core: SwiGLU compiled"}
    fm_1024 = next(r for r in records if r.series == "core: FlashMHF" and r.tokens == 1024)
    assert (fm_1024.impl, fm_1024.mode, fm_1024.ms) == ("FlashMHF", "", 0.5)
    assert fm_1024.tflops == pytest.approx(6.0 * 1024 * D_MODEL * D_FF / 0.5e-3 / 1e12)


def test_layer_rows_give_graph_and_compiled_modes_without_host_times_or_unmeasured_columns():
    records = records_from_rows([_layer(64, 0.2, None).to_dict(), _layer(1024, 1.0, 0.8).to_dict()], "layer")
    assert {r.series for r in records} == {
        "layer: FlashMHF", "layer: FlashMHF CUDA graph", "layer: FlashMHF compiled",
        "layer: SwiGLU", "layer: SwiGLU CUDA graph", "layer: SwiGLU compiled"}  # no host ms: CPU time
    compiled = [r for r in records if r.series == "layer: FlashMHF compiled"]
    assert [r.tokens for r in compiled] == [1024]  # None at T=64 (torch.compile failed): no point
    assert all(r.tflops is not None for r in records)
    assert Record("", "new", "kernel", 1, 1.0).series == "new kernel"


def test_bad_rows_are_errors_naming_the_column():
    with pytest.raises(ValueError, match="tokens"):
        records_from_rows([{"flashmhf_ms": 1.0}])
    with pytest.raises(ValueError, match="swiglu_ms"):
        records_from_rows([{"tokens": 64, "swiglu_ms": "fast"}])


# ------------------------------------------------------------------------------------ result files


def test_tagged_rows_read_back_as_their_run(tmp_path):
    path = _write_run(tmp_path / "layer-fwd.json", _run("layer", [_layer(64, 0.2, 0.1), _layer(1024, 1.0, 0.8)]))
    run = read_run(path)
    assert (run.source, run.bench, run.shape, run.dtype, run.backward, run.device) == \
        ("layer-fwd", "layer", "repo-128m", "bf16", False, "Test GPU")
    assert [r["tokens"] for r in run.rows] == [64, 1024]


def test_untagged_rows_take_shape_dtype_and_gpu_from_the_report_title_beside_them(tmp_path):
    shape = "d_model=512 H=4 d_ff=1024 E=4"  # explicit sizes: a shape with spaces
    rows = [_layer(1024, 1.0, None, backward=True).to_dict()]
    del rows[0]["flop"]  # written before layer rows carried it
    (tmp_path / "old.json").write_text(json.dumps(rows))
    (tmp_path / "old.md").write_text(f"# {report_title(shape, 'fp16', True, 'NVIDIA H200', layer=True)}\n\n| T |\n")
    run = read_run(tmp_path / "old.json")
    assert (run.bench, run.shape, run.dtype, run.backward, run.device) == ("layer", shape, "fp16", True, "NVIDIA H200")
    assert run.rows[0]["flop"] == ffn_flop(1024, 3 * D_MODEL * D_FF, True)  # from the SwiGLU's parameters


def test_result_files_that_cannot_be_charted_are_errors_naming_the_file(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([_core(64, 0.1).to_dict()]))
    with pytest.raises(ValueError, match="bare.json.*no report bare.md"):
        read_run(bare)
    (tmp_path / "bare.md").write_text("# not a bench title\n")
    with pytest.raises(ValueError, match="not a bench report title"):
        read_run(bare)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(list(_run("core", [_core(64, 0.1)]).rows + _run("layer", [_layer(64, 1, 1)]).rows)))
    with pytest.raises(ValueError, match="more than one run"):
        read_run(mixed)
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="expected the .json"):
        read_run(tmp_path / "dict.json")


# ------------------------------------------------------------------------------------ charts


def test_chart_is_a_png_with_every_series_in_the_time_panel_and_flop_series_in_the_tflops_panel(tmp_path):
    records = records_from_rows([_core(t, 0.001 * t).to_dict() for t in (1, 64, 1024)], "core")
    records += [Record("layer", "FlashMHF", "", t, 0.002 * t) for t in (64, 1024)]  # no flop: time only
    path = tmp_path / "chart.png"
    drawn = plot_records(records, path, "repo-128m bf16 forward", note="a note")
    _check_png(path)
    assert drawn["time"] == ["core: FlashMHF", "core: SwiGLU", "core: SwiGLU compiled", "layer: FlashMHF"]
    assert drawn["tflops"] == ["core: FlashMHF", "core: SwiGLU", "core: SwiGLU compiled"]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_records([], tmp_path / "empty.png", "empty")


def test_runs_of_one_bench_are_named_by_file_and_one_chart_holds_one_shape(tmp_path):
    before = _run("core", [_core(64, 0.2), _core(1024, 1.0)], source="before")
    after = _run("core", [_core(64, 0.1), _core(1024, 0.9)], source="after")
    drawn = plot_runs([before, after], tmp_path / "c.png")
    assert "core (before): FlashMHF" in drawn["time"] and "core (after): FlashMHF" in drawn["time"]
    other = _run("core", [_core(64, 0.1)], shape="paper-128m")
    with pytest.raises(ValueError, match="one chart shows one shape"):
        plot_runs([before, other], tmp_path / "d.png")


def test_draw_charts_writes_one_png_per_shape_dtype_and_direction(tmp_path):
    runs = [
        _run("core", [_core(t, 0.01 * t) for t in (1, 64, 1024)]),
        _run("layer", [_layer(t, 0.02 * t, 0.015 * t) for t in (1, 64, 1024)]),
        _run("layer", [_layer(t, 0.05 * t, None, backward=True) for t in (1024, 4096)], shape="paper-128m"),
    ]
    paths = draw_charts(runs, tmp_path)
    assert [p.name for p in paths] == ["repo-128m-bf16-forward.png", "paper-128m-bf16-forward-backward.png"]
    for path in paths:
        _check_png(path)
    explicit = _run("core", [_core(64, 0.1)], shape="d_model=512 H=4 d_ff=1024 E=4")
    assert chart_name(explicit) == "d-model-512-h-4-d-ff-1024-e-4-bf16-forward.png"


def test_module_entry_redraws_charts_from_saved_results_on_cpu(tmp_path, capsys):
    core = _write_run(tmp_path / "core.json", _run("core", [_core(t, 0.01 * t) for t in (1, 64, 1024)]))
    layer = _write_run(tmp_path / "layer.json", _run("layer", [_layer(t, 0.02 * t, None) for t in (1, 64, 1024)]))
    out = tmp_path / "charts"
    out.mkdir()
    plot.main([str(core), str(layer), "--out-dir", str(out)])
    assert capsys.readouterr().out.strip() == f"chart: {out / 'repo-128m-bf16-forward.png'}"
    _check_png(out / "repo-128m-bf16-forward.png")
    plot.main([str(core)])  # default: beside the first report
    assert (tmp_path / "repo-128m-bf16-forward.png").stat().st_size > 10_000


def test_module_entry_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m flashmhf.bench.plot") and "--out-dir" in out
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path / "bad.json")])
    assert exit_info.value.code == 2 and "expected the .json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "bad.json"), "--out-dir", str(tmp_path / "nope")])
    assert "not a folder" in capsys.readouterr().err


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as the base install has it: not importable."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_missing_matplotlib_names_the_extra(no_matplotlib, tmp_path, capsys):
    with pytest.raises(plot.PlotUnavailable, match=r"pip install 'flashmhf\[plot\]'"):
        plot_records([Record("", "FlashMHF", "", 1, 1.0)], tmp_path / "x.png", "t")
    core = _write_run(tmp_path / "core.json", _run("core", [_core(64, 0.1)]))
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(core)])
    assert "flashmhf[plot]" in str(exit_info.value.code)
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------------------------ bench --plot


@pytest.fixture
def fake_gpu(monkeypatch):
    """bench on CPU: CUDA 'available' and the core/layer measurements replaced by fixed rows."""
    import torch

    import flashmhf.bench.core as core
    import flashmhf.bench.layer as layer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(core, "bench_core", lambda spec, d_ff, t, **kw: _core(t, 0.01 * t, kw["backward"]))
    monkeypatch.setattr(layer, "bench_layer", lambda module, t, **kw: _layer(t, 0.02 * t, 0.015 * t, kw["backward"]))
    monkeypatch.setattr("flashmhf.cli.bench_cmd._layer", lambda *a: None)


def test_bench_plot_draws_the_layer_with_the_core_run_beside_the_report(fake_gpu, tmp_path):
    runner = CliRunner()
    core_out = tmp_path / "core-fwd.md"
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--tokens", "1,64,1024", "--compile",
                                  "--out", str(core_out)])
    assert result.exit_code == 0, result.output
    assert core_out.read_text().startswith("# repo-128m bf16 forward on Test GPU")
    assert read_run(core_out.with_suffix(".json")).bench == "core"
    assert not list(tmp_path.glob("*.png"))  # no --plot, no chart
    out = tmp_path / "layer-fwd.md"
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--tokens", "1,64,1024", "--compile", "--layer",
                                  "--out", str(out), "--plot", "--plot-with", str(core_out.with_suffix(".json"))])
    assert result.exit_code == 0, result.output
    chart = tmp_path / "repo-128m-bf16-forward.png"
    assert f"chart: {chart}" in result.output
    _check_png(chart)
    run = read_run(out.with_suffix(".json"))
    assert (run.bench, run.shape, run.dtype, run.device) == ("layer", "repo-128m", "bf16", "Test GPU")
    assert out.read_text().startswith("# repo-128m bf16 layer forward on Test GPU")


def test_bench_plot_options_are_checked_before_measuring(fake_gpu, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--plot"])
    assert result.exit_code != 0 and "--out" in result.output
    report = _write_run(tmp_path / "r.json", _run("core", [_core(64, 1.0, backward=True)]))
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", "--plot-with", str(report)])
    assert result.exit_code != 0 and "--plot" in result.output
    x = ["--out", str(tmp_path / "x.md"), "--plot", "--plot-with", str(report)]
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", *x])
    assert result.exit_code != 0 and "repo-128m bf16 forward+backward, this run repo-128m bf16 forward" in result.output
    result = runner.invoke(main, ["bench", "--preset", "paper-128m", "--backward", *x])
    assert result.exit_code != 0 and "one chart shows one" in result.output
    report.write_text("{}")
    result = runner.invoke(main, ["bench", "--preset", "repo-128m", *x])
    assert result.exit_code != 0 and "expected the .json" in result.output
    assert not (tmp_path / "x.md").exists()  # nothing was measured


def test_bench_plot_without_matplotlib_or_a_gpu_says_what_to_do(no_matplotlib, monkeypatch, tmp_path):
    import torch

    runner = CliRunner()
    args = ["bench", "--preset", "repo-128m", "--out", str(tmp_path / "x.md"), "--plot"]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "pip install 'flashmhf[plot]'" in result.output
    monkeypatch.undo()  # matplotlib back; no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "python -m flashmhf.bench.plot REPORT.json" in result.output


# ------------------------------------------------------------------------------------ committed charts


def test_committed_charts_are_small_pngs():
    charts = sorted((REPO / "docs").rglob("*.png"))
    assert len(charts) >= 5  # the README's H200 charts and the example's loss curves
    big = [f"{p.relative_to(REPO)}: {p.stat().st_size // 1024} KB" for p in charts if p.stat().st_size >= 200 * 1024]
    assert not big, f"charts over 200 KB: {big}"
    for path in charts:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_chart_script_writes_the_readme_chart_names(tmp_path):
    """scripts/bench_charts.sh with its bench runs stubbed: the charts the README shows, by name."""
    import subprocess

    fake_cli = tmp_path / "fake_cli.py"
    fake_cli.write_text(f"""import sys
sys.path.insert(0, {str(REPO)!r})
import torch
import flashmhf.bench.core as core, flashmhf.bench.layer as layer, flashmhf.cli.bench_cmd as bench_cmd
from tests import test_bench_plot as t
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *a: "Test GPU"
core.bench_core = lambda spec, d_ff, n, **kw: t._core(n, 0.01 * n, kw["backward"])
layer.bench_layer = lambda module, n, **kw: t._layer(n, 0.02 * n, 0.015 * n, kw["backward"])
bench_cmd._layer = lambda *a: None
from flashmhf.cli.app import main
main(sys.argv[1:])
""")
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {fake_cli} "$@"\n')  # drops "-m flashmhf.cli"
    fake_python.chmod(0o755)
    out = tmp_path / "charts"
    done = subprocess.run(["bash", str(REPO / "scripts" / "bench_charts.sh"), str(out), "repo-128m"],
                          env={**__import__("os").environ, "PYTHON": str(fake_python)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["repo-128m-bf16-forward-backward.png",
                                                         "repo-128m-bf16-forward.png"]
    for path in out.glob("*.png"):
        _check_png(path)
    assert {read_run(p).bench for p in out.glob("*.json")} == {"core", "layer"}
