"""`flashmhf cache …` through click's CliRunner (never the real user cache)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flashmhf.cache import paths
from flashmhf.cache.store import TuningCache
from flashmhf.cli.app import main
from tests.helpers import isolated_caches
from tests.test_cache_store import cfg, key, make_bad_files

SHAPE = ["--d-model", "64", "--heads", "2", "--d-ff", "64", "--experts", "2"]



@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    yield from isolated_caches(tmp_path, monkeypatch)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "filled.sqlite"
    with TuningCache(path) as c:
        c.record_trial(key(64), cfg(), "ok", median_ms=2.0)
        c.record_trial(key(64), cfg(block_f=32), "ok", median_ms=1.0)
        c.record_trial(key(64), cfg(split=2), "compile-error", error="no\nsecond line")
        c.record_trial(key(128, dtype="bf16"), cfg(), "ok", median_ms=3.0)
        c.record_trial(key(256, template_hash="feedfacefeedface"), cfg(), "ok", median_ms=3.0)
    return path


def one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_help_lists_subcommands():
    result = run("cache", "--help")
    assert result.exit_code == 0
    for name in ("ls", "show", "export", "import", "merge", "verify", "rm"):
        assert name in result.output


def test_ls_files_in_effect(filled, monkeypatch):
    monkeypatch.setenv("FLASHMHF_CACHE", str(filled))
    result = run("cache", "ls")
    assert result.exit_code == 0, result.output
    assert "FLASHMHF_CACHE" in result.output and "schema ok" in result.output
    assert "not created yet" in result.output  # the user file
    assert not paths.user_cache_path().exists()


def test_ls_keys_of_a_file(filled):
    result = run("cache", "ls", "--cache", str(filled))
    assert result.exit_code == 0, result.output
    assert "H2 d_h32 E2x32" in result.output and "(stale)" in result.output and "block_f=32" in result.output
    result = run("cache", "ls", "--cache", str(filled), "--dtype", "bf16")
    assert "bf16" in result.output and "fp32" not in result.output


def test_show_marks_best(filled):
    result = run("cache", "show", "--cache", str(filled), *SHAPE, "--dtype", "fp32", "--tokens", "40")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "compile-error" in out and "second line" not in out
    best_line = next(line for line in out.splitlines() if "block_f=32" in line)
    assert "*" in best_line and "1.0000" in best_line
    assert "T<=64" in out and "T<=128" not in out
    result = run("cache", "show", "--cache", str(filled), "--preset", "repo-1.3b")
    assert result.exit_code == 0 and "no matching keys" in result.output


def test_export_import_merge(filled, tmp_path):
    out = tmp_path / "out.json"
    result = run("cache", "export", "--cache", str(filled), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["results"]) == 3
    result = run("cache", "export", "--cache", str(filled), "--dtype", "bf16")
    assert json.loads(result.stdout)["results"][0]["key"]["dtype"] == "bf16"

    result = run("cache", "import", str(out))  # into the user cache, created
    assert result.exit_code == 0, result.output
    assert "5 new trials" in result.output
    with TuningCache(paths.user_cache_path(), readonly=True) as c:
        assert c.counts() == {"keys": 3, "trials": 5, "best": 3}
    assert "0 new trials" in run("cache", "import", str(out)).output
    line = one_error_line(run("cache", "import", str(filled)))
    assert "cache merge" in line

    single = tmp_path / "single.sqlite"
    result = run("cache", "export", "--cache", str(filled), "--dtype", "fp32", "-o", str(single))
    assert result.exit_code == 0 and "exported 4 trials of 2 keys" in result.output
    with TuningCache(single, readonly=True) as c:
        assert c.counts()["trials"] == 4

    merged = tmp_path / "merged.sqlite"
    result = run("cache", "merge", str(filled), str(paths.user_cache_path()), "--cache", str(merged))
    assert result.exit_code == 0, result.output
    assert "5 new trials" in result.output and "0 new trials" in result.output
    one_error_line(run("cache", "merge", str(merged), "--cache", str(merged)))


def test_verify_ok_and_warnings(filled):
    result = run("cache", "verify", "--cache", str(filled))
    assert result.exit_code == 0, result.output
    assert "warning: stale" in result.output and ": ok (" in result.output


def failed_without_traceback(result) -> list[str]:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: "), result.output
    return lines


@pytest.mark.parametrize("which", ["garbage", "foreign", "newer"])
def test_verify_bad_file_is_reported_without_traceback(tmp_path, which):
    bad = make_bad_files(tmp_path)[which]
    lines = failed_without_traceback(run("cache", "verify", "--cache", str(bad)))
    assert lines[0].startswith(f"{bad}: error: ") and str(bad) in lines[-1]
    one_error_line(run("cache", "ls", "--cache", str(bad)))


def test_verify_damaged_best_fails(filled):
    with TuningCache(filled) as c:
        c.conn.execute("UPDATE best SET median_ms = 99")
    result = run("cache", "verify", "--cache", str(filled))
    assert result.exit_code == 1 and "error: best of key" in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")


def test_missing_files_are_one_line():
    failed_without_traceback(run("cache", "verify"))
    one_error_line(run("cache", "show"))
    one_error_line(run("cache", "rm", "--kind", "fwd", "--yes"))


def test_rm(filled):
    assert run("cache", "rm", "--cache", str(filled)).exit_code == 2  # no filter: usage error
    result = run("cache", "rm", "--cache", str(filled), "--dtype", "bf16", input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    with TuningCache(filled, readonly=True) as c:
        assert c.counts()["keys"] == 3
    result = run("cache", "rm", "--cache", str(filled), "--stale", "--yes")
    assert result.exit_code == 0 and "removed 1 keys (1 trials)" in result.output
    result = run("cache", "rm", "--cache", str(filled), "--dtype", "bf16", input="y\n")
    assert result.exit_code == 0 and "removed 1 keys" in result.output
    result = run("cache", "rm", "--cache", str(filled), "--all", "--yes")
    assert "removed 1 keys (3 trials)" in result.output
    with TuningCache(filled, readonly=True) as c:
        assert c.counts() == {"keys": 0, "trials": 0, "best": 0}


def test_bad_filter_is_one_line(filled):
    one_error_line(run("cache", "ls", "--cache", str(filled), "--d-model", "64"))
    one_error_line(run("cache", "ls", "--cache", str(filled), "--tokens", "0"))
