"""examples/train_llama.py: a couple of steps of both models at the --tiny size, on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # it imports train_tiny_lm from beside it
    spec = importlib.util.spec_from_file_location("train_llama", EXAMPLES / "train_llama.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_train_llama_runs_both_models_and_writes_json_and_plot(tmp_path, monkeypatch):
    example = load_example(monkeypatch)
    out, png = tmp_path / "results.json", tmp_path / "loss.png"
    args = ["--tiny", "--steps", "2", "--batch", "2", "--seq", "16", "--log-every", "1", "--out", str(out),
            "--plot", str(png), "--device", "cpu"]
    report = example.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["args"]["d_model"] == 64 and report["args"]["seq"] == 16  # --tiny, but explicit flags win
    flash, swiglu = report["models"]["flashmhf"], report["models"]["swiglu"]
    assert abs(flash["params"] - swiglu["params"]) < 0.02 * flash["params"]  # equal parameter count
    for res in (flash, swiglu):
        assert [step for step, _ in res["losses"]] == [0, 1]
        assert all(abs(loss - math.log(256)) < 0.5 for _, loss in res["losses"])  # untrained: ~uniform bytes
        assert res["tokens_per_s"] > 0 and math.isfinite(res["val_loss"])
        assert res["peak_memory_mib"] is None  # measured on CUDA only
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_llama_refuses_unknown_models(monkeypatch, capsys):
    example = load_example(monkeypatch)
    with pytest.raises(SystemExit):
        example.parse_args(["--models", "flashmhf,moe"])
    err = capsys.readouterr().err
    assert "--models: expected a comma-separated subset of flashmhf,swiglu, got 'flashmhf,moe'" in err
