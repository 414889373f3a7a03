"""Cache files built to hurt: bad rows, hostile text, huge imports, held locks, read-only places,
clumsy export targets. The runtime must keep running right, the CLI must answer in one clear line."""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
import subprocess
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import flashmhf_runtime
from flashmhf.cache import portable, store
from flashmhf.cache.device import device_info
from flashmhf.cache.lookup import CacheWarning, find_config
from flashmhf.cache.store import TuningCache
from flashmhf.cli.app import main
from tests.helpers import core_inputs, isolated_caches, reference_core, rel_error
from tests.test_cache_store import SPEC, cfg, key, plant


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    yield from isolated_caches(tmp_path, monkeypatch)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


# ---- 1. bad rows ---------------------------------------------------------------------------------

GOOD = cfg(block_f=32)
BAD_CONFIGS = [
    [1, 2], None, 123, {**cfg(), "block_m": [16]}, cfg(num_warps=2**100), cfg(num_stages=0, tma=7),
]


def hostile_rows() -> list:
    """At bucket 64 a valid but slower config under a best whose config is bad, and around it keys
    with bad buckets and bad times."""
    k64 = key(64).to_dict()
    rows = [(k64, GOOD, "ok", 2.0)]
    rows += [(k64, c, "ok", 0.5 + i / 100) for i, c in enumerate(BAD_CONFIGS)]
    rows += [({**k64, "bucket": b}, cfg(), "ok", 0.1) for b in (0, -16, "abc")]
    rows += [(key(128).to_dict(), cfg(), "ok", -1e9)]
    return rows


def test_bad_rows_are_skipped_with_one_warning_and_the_next_best_runs(tmp_path, monkeypatch):
    path = tmp_path / "hostile.sqlite"
    plant(path, hostile_rows())
    monkeypatch.setenv("FLASHMHF_CACHE", str(path))
    with pytest.warns(CacheWarning) as record:
        found = find_config(SPEC, 64, device_info())
    assert found == (GOOD, f"FLASHMHF_CACHE:{path} bucket 64")
    assert len(record) == 1 and "unusable tuned row(s) skipped" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_config(SPEC, 128, device_info())[0] == GOOD  # -1e9 never wins: the nearest valid row does

    # The op runs through the same lookup (under the interpreter in the tests) and is right.
    q, k, u, v, r = core_inputs(40, 2, 2, 32, 2, 32, torch.float32, seed=0)
    flashmhf_runtime.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        s = flashmhf_runtime.flash_mhf(q, k, u, v, r)
    assert rel_error(s, reference_core(q, k, u, v, r)) < 1e-4


def test_verify_reports_every_bad_row(tmp_path):
    path = tmp_path / "hostile.sqlite"
    plant(path, hostile_rows())
    result = run("cache", "verify", "--cache", str(path))
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = result.output
    for needle in ("[1, 2]", "block_m must be an integer", "num_warps=12676506002282294014967032053",
                   "num_stages=0", "got -16", "got 'abc'", "-1000000000"):
        assert needle in out, (needle, out)


def test_merge_skips_bad_rows_and_import_refuses_them(tmp_path):
    path = tmp_path / "hostile.sqlite"
    plant(path, hostile_rows())
    target = tmp_path / "merged.sqlite"
    result = run("cache", "merge", str(path), "--cache", str(target))
    assert result.exit_code == 0, result.output
    assert "1 new trials merged" in result.output and "unusable row(s) skipped" in result.output
    with TuningCache(target, readonly=True) as c:
        assert c.verify() == [] and c.best(key(64)).config == GOOD

    doc = {"format": "flashmhf-tuning-cache", "schema_version": 1, "results": [
        {"key": key(64).to_dict(), "trials": [
            {"config": cfg(num_warps=2**100), "status": "ok", "median_ms": 1.0, "recorded_at": "2026"}]}]}
    with TuningCache(tmp_path / "i.sqlite") as c, pytest.raises(ValueError, match=r"trials\[0\]\.config"):
        portable.import_json(c, io.StringIO(json.dumps(doc)))
    doc["results"][0]["trials"][0].update(config=cfg(), median_ms=-1e9)
    with TuningCache(tmp_path / "i.sqlite") as c, pytest.raises(ValueError, match=r"trials\[0\]\.median_ms"):
        portable.import_json(c, io.StringIO(json.dumps(doc)))


def test_the_tuner_cannot_record_a_config_outside_the_space(tmp_path):
    with TuningCache(tmp_path / "t.sqlite") as c:
        for bad in (cfg(num_stages=0, tma=7), cfg(num_warps=2**100), {**cfg(), "block_m": [16]}):
            with pytest.raises(ValueError, match="config"):
                c.record_trial(key(), bad, "ok", median_ms=1.0)
        with pytest.raises(ValueError, match="median_ms"):
            c.record_trial(key(), cfg(), "ok", median_ms=0.0)


# ---- 2. hostile text ------------------------------------------------------------------------------

HOSTILE = "[/bad][link=file:///etc/passwd]x[/link]\x1b]0;owned\x07[bold]"


def test_hostile_text_in_every_column_is_printed_as_text(tmp_path, monkeypatch):
    path = tmp_path / "x[/bad].sqlite"
    k = key(64, device=device_info().name, triton_version=HOSTILE, space_hash=HOSTILE)
    plant(path, [(k.to_dict(), GOOD, "ok", 1.0), ({**k.to_dict(), "kind": "fwd" + HOSTILE}, cfg(), "ok", 1.0)])
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE trials SET host = ?, error = ?, source = ?, torch_version = ?, recorded_at = ?",
                     (HOSTILE,) * 5)
        conn.execute("INSERT INTO kernel_sources VALUES ('fwd', 2, 2, 32, 2, 32, 'fp32', ?, ?, 'x', 'now')",
                     (k.template_hash, HOSTILE))
    conn.close()
    monkeypatch.setenv("FLASHMHF_CACHE", str(path))
    for args in (["cache", "ls"], ["cache", "ls", "--cache", str(path)], ["cache", "show", "--cache", str(path),
                 "--source"], ["cache", "verify", "--cache", str(path)], ["doctor"]):
        result = run(*args)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Traceback" not in result.output
        assert "\x1b" not in result.output and "\x07" not in result.output, args
        assert "[/bad]" in result.output, (args, result.output)
    assert "[link=file:///etc/passwd]" in run("cache", "show", "--cache", str(path)).output


# ---- 3. big imports, held locks -------------------------------------------------------------------

def _import_steps(tmp_path: Path, n: int) -> int:
    """SQLite virtual-machine steps of importing ``n`` repeated trials of one config (deterministic)."""
    trials = [{"config": cfg(), "status": "ok", "median_ms": 1.0 + i * 1e-6, "recorded_at": f"t{i}"}
              for i in range(n)]
    doc = {"format": "flashmhf-tuning-cache", "schema_version": 1,
           "results": [{"key": key(64).to_dict(), "trials": trials}]}
    rows = portable.read_export(io.StringIO(json.dumps(doc)))
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    with TuningCache(tmp_path / f"steps{n}.sqlite") as c:
        c.conn.set_progress_handler(count, 1000)
        assert c.add_trials(rows) == n
    return steps[0]


def test_import_is_linear_in_repeated_trials_and_commits_in_batches(tmp_path, monkeypatch):
    small, large = _import_steps(tmp_path, 1000), _import_steps(tmp_path, 4000)
    assert large < 6 * small, (small, large)  # 4x the trials: ~4x the work (quadratic would be ~16x)

    monkeypatch.setattr(store, "BATCH_TRIALS", 100)
    commits = []
    with TuningCache(tmp_path / "batches.sqlite") as c:
        c.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
        rows = [(key(64), {"config": json.dumps(cfg(block_m=16 * 2 ** (i % 4)), separators=(",", ":"),
                                                sort_keys=True),
                           "status": "ok", "median_ms": 1.0 + i, "p20_ms": None, "p80_ms": None, "torch_version": "",
                           "error": None, "source": None, "host": "", "recorded_at": f"t{i}"}) for i in range(250)]
        assert c.add_trials(rows) == 250
        assert len(commits) == 3
        assert c.verify() == []


def test_deeply_nested_json_is_one_error(tmp_path):
    bad = tmp_path / "deep.json"
    bad.write_text("[" * 200_000)
    line = one_error_line(run("cache", "import", str(bad), "--cache", str(tmp_path / "t.sqlite")))
    assert "nested too deeply" in line and str(bad) in line


@contextmanager
def write_lock_held(path: Path):
    """Another process's view: a connection holding the file's write lock until released."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.1, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def test_a_writer_waits_for_a_held_lock_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.1)
    path = tmp_path / "locked.sqlite"
    TuningCache(path).close()
    with TuningCache(path) as c, write_lock_held(path) as other:
        threading.Timer(3.0, lambda: other.execute("ROLLBACK")).start()
        t0 = time.monotonic()
        with pytest.warns(CacheWarning, match="locked by another writer; waiting"):
            c.record_trial(key(), cfg(), "ok", median_ms=1.0)
        assert time.monotonic() - t0 >= 2.5
        assert c.counts()["trials"] == 1


def test_a_lock_never_loses_a_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(store, "LOCK_WAIT_S", 0.3)
    path = tmp_path / "locked.sqlite"
    TuningCache(path).close()
    c = TuningCache(path)
    with write_lock_held(path):
        with pytest.warns(CacheWarning, match="kept"):
            c.record_trial(key(), cfg(), "ok", median_ms=1.0)  # no exception: kept in memory
    c.record_trial(key(), cfg(block_f=32), "ok", median_ms=2.0)  # writes both
    assert c.counts()["trials"] == 2

    with write_lock_held(path):
        with pytest.warns(CacheWarning):
            c.record_trial(key(), cfg(num_warps=8), "ok", median_ms=3.0)
        with pytest.warns(CacheWarning, match="cache import"):
            c.close()  # still locked: written to a side file
    side = list(tmp_path.glob("locked.sqlite.pending-*.json"))
    assert len(side) == 1
    with TuningCache(path) as again:
        assert portable.import_json(again, side[0]) == 1 and again.counts()["trials"] == 3


# ---- 5. read-only places --------------------------------------------------------------------------

@contextmanager
def read_only(path: Path):
    """Make a file or folder unwritable, also for root (an immutable attribute) where the platform allows."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only file here (not root-immutable: no chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_wal_file_that_cannot_be_read_is_reported(tmp_path):
    src = tmp_path / "src" / "tuned.sqlite"
    with TuningCache(src) as c:
        c.record_trial(key(), cfg(), "ok", median_ms=1.0)
    holder = sqlite3.connect(src)  # keeps the -wal from being checkpointed away
    holder.execute("PRAGMA wal_autocheckpoint = 0")
    with holder:
        holder.execute("INSERT OR REPLACE INTO meta VALUES ('note', 'only in the -wal')")
    ro = tmp_path / "ro"
    ro.mkdir()
    for suffix in ("", "-wal"):
        (ro / f"tuned.sqlite{suffix}").write_bytes(src.with_name(src.name + suffix).read_bytes())
    holder.close()
    assert (ro / "tuned.sqlite-wal").stat().st_size > 0 and not (ro / "tuned.sqlite-shm").exists()
    with read_only(ro):
        with pytest.warns(CacheWarning, match="tuned.sqlite-wal cannot be read"):
            TuningCache(ro / "tuned.sqlite", readonly=True).close()


def test_exported_sqlite_is_a_single_rollback_journal_file(tmp_path):
    src = tmp_path / "src.sqlite"
    with TuningCache(src) as c:
        c.record_trial(key(), cfg(), "ok", median_ms=1.0)
    out = tmp_path / "ship.sqlite"
    assert run("cache", "export", "--cache", str(src), "-o", str(out)).exit_code == 0
    conn = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ship") or p.name.startswith(".ship")] == \
        ["ship.sqlite"]


# ---- 6. export targets and merge ties -------------------------------------------------------------

@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "filled.sqlite"
    with TuningCache(path) as c:
        c.record_trial(key(), cfg(), "ok", median_ms=1.0)
    return path


def test_export_targets(filled, tmp_path):
    line = one_error_line(run("cache", "export", "--cache", str(filled), "-o", str(tmp_path)))
    assert "is a directory" in line
    existing = tmp_path / "existing.json"
    existing.write_text("keep me")
    for name in ("existing.json",):
        line = one_error_line(run("cache", "export", "--cache", str(filled), "-o", str(tmp_path / name)))
        assert "already exists" in line and "--force" in line
    assert existing.read_text() == "keep me"
    assert run("cache", "export", "--cache", str(filled), "-o", str(existing), "--force").exit_code == 0
    assert json.loads(existing.read_text())["format"] == "flashmhf-tuning-cache"

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    for extra in ([], ["--force"]):
        line = one_error_line(run("cache", "export", "--cache", str(filled), "-o", str(link), *extra))
        assert "symbolic link" in line
    assert victim.read_text() == "precious"
    sq = tmp_path / "a.sqlite"
    assert run("cache", "export", "--cache", str(filled), "-o", str(sq)).exit_code == 0
    assert "already exists" in one_error_line(run("cache", "export", "--cache", str(filled), "-o", str(sq)))


def test_merge_breaks_exact_ties_by_config_not_by_argument_order(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    with TuningCache(a) as c:
        c.record_trial(key(), cfg(num_warps=8), "ok", median_ms=1.0)
    with TuningCache(b) as c:
        c.record_trial(key(), cfg(block_f=32), "ok", median_ms=1.0)
    bests = []
    for order in ((a, b), (b, a)):
        out = tmp_path / f"m{len(bests)}.sqlite"
        assert run("cache", "merge", *map(str, order), "--cache", str(out)).exit_code == 0
        with TuningCache(out, readonly=True) as c:
            bests.append(c.best(key()).config)
    # recording one after the other ties the same way
    with TuningCache(tmp_path / "r.sqlite") as c:
        c.record_trial(key(), cfg(num_warps=8), "ok", median_ms=1.0)
        c.record_trial(key(), cfg(block_f=32), "ok", median_ms=1.0)
        bests.append(c.best(key()).config)
    assert bests == [cfg(num_warps=8)] * 3  # canonical text '{"block_f":16,…' sorts before '{"block_f":32,…'


# ---- 10. reporting --------------------------------------------------------------------------------

def test_a_cache_warning_is_one_warning_and_no_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FLASHMHF_CACHE", str(tmp_path / "missing.sqlite"))
    with caplog.at_level(logging.INFO, logger="flashmhf"), pytest.warns(CacheWarning) as record:
        find_config(SPEC, 64, device_info())
    assert len(record) == 1 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_directory_is_reported_as_a_directory(tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    monkeypatch.setenv("FLASHMHF_CACHE", str(folder))
    with pytest.warns(CacheWarning, match="is a directory, not a cache file"):
        assert find_config(SPEC, 64, device_info()) is None
    out = run("doctor").output
    assert "a directory, not a cache file" in out and "missing" not in out


def test_damaged_pages_behind_a_good_header_are_reported(tmp_path, monkeypatch):
    path = tmp_path / "damaged.sqlite"
    with TuningCache(path) as c:
        for b in range(8):
            for i in range(30):
                c.record_trial(key(2**b), cfg(block_m=16 * 2 ** (i % 4)), "ok", median_ms=1.0 + i, error="x" * 300)
        c.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    for p in range(3, len(data) // page - 1, 2):  # every other page past the schema: garbage
        data[p * page + 8: p * page + 200] = b"\xff" * 192
    path.write_bytes(bytes(data))
    monkeypatch.setenv("FLASHMHF_CACHE", str(path))
    with pytest.warns(CacheWarning, match="skipping tuning cache"):
        find_config(SPEC, 64, device_info())


def test_verify_checks_every_file(tmp_path, filled):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database" * 100)
    result = run("cache", "verify", "--cache", str(garbage), "--cache", str(filled))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{garbage}: error:" in result.output and f"{filled}: ok (1 keys" in result.output


def test_import_of_a_non_json_file_names_it_and_creates_nothing(tmp_path):
    binary = tmp_path / "blob.json"
    binary.write_bytes(bytes(range(256)) * 4)
    text = tmp_path / "notes.json"
    text.write_text("hello")
    target = tmp_path / "new.sqlite"
    for bad in (binary, text):
        line = one_error_line(run("cache", "import", str(bad), "--cache", str(target)))
        assert str(bad) in line
    assert not target.exists()
