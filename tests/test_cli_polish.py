"""The command line as a new user meets it: errors first and in one line, help text that shows what
it says, configs printed whole."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from rich.console import Console

from flashmhf.cache.store import TuningCache
from flashmhf.cli import cache_cmd, doctor_cmd
from flashmhf.cli.app import main
from tests.helpers import isolated_caches
from tests.test_cache_store import cfg, key

SHAPE = ["--d-model", "64", "--heads", "2", "--d-ff", "64", "--experts", "2"]



@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    yield from isolated_caches(tmp_path, monkeypatch)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_doctor_prints_the_extra_it_names(monkeypatch):
    real = doctor_cmd._version
    monkeypatch.setattr(doctor_cmd, "_version", lambda dist: None if dist == "optuna" else real(dist))
    result = run("doctor")
    assert result.exit_code == 0 and "pip install 'flashmhf[tune]'" in result.output


@pytest.mark.parametrize("bad,says", [
    (["--tokens", "abc"], "--tokens"),
    (["--dtype", "fp64"], "--dtype"),
    (["--kind", "fwd,nope"], "--kind"),
    (["--trials", "0"], "--trials"),
])
def test_tune_argument_errors_come_before_anything_else(bad, says):
    assert says in one_error_line(run("tune", *SHAPE, *bad))


def test_tune_with_a_bad_cache_says_so_first(tmp_path):
    garbage = tmp_path / "notes.sqlite"
    garbage.write_text("not a cache\n" * 100)
    assert "not a usable SQLite file" in one_error_line(run("tune", *SHAPE, "--cache", str(garbage)))
    result = run("tune", *SHAPE, "--cache", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.output and "Traceback" not in result.output


def test_show_rejects_a_negative_token_count():
    assert "--tokens must be a positive token count" in one_error_line(run("show", *SHAPE, "--tokens", "-1"))


def test_show_says_where_a_kind_does_not_run_instead_of_compiling_it():
    # A Gluon kind for an A100 made ptxas abort the process; a token count outside a kind's range
    # showed a config the runtime never launches there.
    said = one_error_line(run("show", "--preset", "repo-370m", "--kind", "fwd_ws", "--resources", "--capability", "80"))
    assert "fwd_ws does not run on sm_80" in said and "wgmma" in said
    said = one_error_line(run("show", "--preset", "repo-370m", "--kind", "fwd_ws_split", "--tokens", "8192"))
    assert "fwd_ws_split runs up to 4096 tokens" in said
    assert "runs from 1024 tokens" in one_error_line(run("show", "--preset", "repo-370m", "--kind", "fwd_ws",
                                                         "--tokens", "100"))
    assert run("show", "--preset", "repo-370m", "--kind", "fwd_ws_split", "--tokens", "1024").exit_code == 0


@pytest.mark.parametrize("width", [100, None])
def test_configs_are_printed_whole_in_narrow_terminals_and_pipes(tmp_path, monkeypatch, width):
    path = tmp_path / "c.sqlite"
    config = cfg(block_m=128, block_f=32, num_warps=8, num_stages=5, split=16, tma=1)
    with TuningCache(path) as c:
        c.record_trial(key(64), config, "ok", median_ms=1.2345)
        c.record_trial(key(1024), config, "ok", median_ms=2.5)
    if width:
        monkeypatch.setattr(cache_cmd, "data_console", lambda: Console(markup=False, highlight=False, width=width))
    for args in (["cache", "ls", "--cache", str(path)], ["cache", "show", "--cache", str(path)]):
        out = run(*args).output
        for item in ("block_m=128", "block_f=32", "num_warps=8", "num_stages=5", "split=16", "tma=1"):
            assert item in out, (args, item, out)
        assert "…" not in out.split("best config")[-1] or width, out
