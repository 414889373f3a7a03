"""`flashmhf doctor` on a CPU machine: versions, files in effect, what is tuned and what is stale."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from flashmhf.cache import paths
from flashmhf.cache.store import TuningCache
from flashmhf.cli.app import main
from flashmhf.codegen import Spec
from flashmhf_runtime.presets import get_preset
from tests.helpers import isolated_caches
from tests.test_cache_store import cfg, key, make_bad_files


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    yield from isolated_caches(tmp_path, monkeypatch)


def preset_spec(name: str, kind: str = "fwd", dtype: str = "bf16") -> Spec:
    p = get_preset(name)
    return Spec(kind, *p.shape, dtype)


def test_doctor_without_cache_files():
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.output
    for word in ("Python", "torch", "triton", "optuna", "not created yet", "nothing tuned", "repo-1.3b"):
        assert word in out
    assert "no GPU" in out or "GPU 0" in out
    assert not paths.user_cache_path().exists()


def test_doctor_reports_tuned_stale_and_bad_files(tmp_path, monkeypatch):
    spec = preset_spec("paper-128m")
    with TuningCache(paths.user_cache_path()) as c:
        c.record_trial(key(64, spec=spec), cfg(), "ok", median_ms=1.0)
        c.record_trial(key(4096, spec=spec), cfg(), "ok", median_ms=1.0)
        c.record_trial(key(512, spec=spec, template_hash="feedfacefeedface"), cfg(), "ok", median_ms=1.0)
        c.record_trial(key(8, spec=spec, triton_version="0.0.1"), cfg(), "ok", median_ms=1.0)
        c.record_trial(key(64, spec=spec, device="some-other-gpu"), cfg(), "ok", median_ms=1.0)
    bad = make_bad_files(tmp_path)["newer"]
    monkeypatch.setenv("FLASHMHF_CACHE", str(bad))
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.output
    row = next(line for line in out.splitlines() if "paper-128m" in line)
    assert "fwd" in row and "bf16" in row and "64 4096" in row and "8 512" in row
    assert "feedfacefeedface" in out and "Triton 0.0.1" in out
    assert "newer than this flashmhf" in out
    assert "schema ok" in out
