"""The tuning-cache store: schema, trials and bests, concurrency, SIGKILL, bad files, merge, JSON."""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flashmhf.cache.device import device_info
from flashmhf.cache.portable import export_json, import_json
from flashmhf.cache.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    CacheFileError,
    ResultKey,
    TuningCache,
    canonical_config,
)
from flashmhf.codegen import Spec

# A tiny fwd spec (d_model 64, d_ff 64) and configs its kind accepts.
SPEC = Spec("fwd", 2, 2, 32, 2, 32, "fp32")
REPO = Path(__file__).resolve().parents[1]


def cfg(block_m: int = 16, block_f: int = 16, num_warps: int = 4, num_stages: int = 1, split: int = 1,
        tma: int = 0) -> dict:
    return {"block_m": block_m, "block_f": block_f, "num_warps": num_warps, "num_stages": num_stages, "split": split,
            "tma": tma}


def key(bucket: int = 64, spec: Spec = SPEC, **replace) -> ResultKey:
    """The key of ``spec`` at ``bucket`` here, with fields replaced (a spec field replaces it in the spec)."""
    spec_fields = {f.name for f in dataclasses.fields(Spec)}
    spec = dataclasses.replace(spec, **{k: v for k, v in replace.items() if k in spec_fields})
    rest = {k: v for k, v in replace.items() if k not in spec_fields}
    return dataclasses.replace(ResultKey.for_spec(spec, bucket, device_info()), **rest)


def plant(path: Path, rows: list[tuple[dict, object, str, object]]) -> None:
    """Write rows as a careless or hostile tool could: (key fields, config as stored, status, median)
    straight into the tables, then let the file's best rows be recomputed from them."""
    from flashmhf.cache.store import KEY_FIELDS

    TuningCache(path).close()
    conn = sqlite3.connect(path)
    with conn:
        for i, (kd, config, status, median) in enumerate(rows):
            values = [kd[f] for f in KEY_FIELDS]
            conn.execute(f"INSERT OR IGNORE INTO result_keys ({', '.join(KEY_FIELDS)}) VALUES "
                         f"({', '.join('?' * len(KEY_FIELDS))})", values)
            key_id = conn.execute(f"SELECT id FROM result_keys WHERE {' AND '.join(f + ' = ?' for f in KEY_FIELDS)}",
                                  values).fetchone()[0]
            text = config if isinstance(config, str) else json.dumps(config)
            conn.execute("INSERT INTO trials (key_id, config, status, median_ms, recorded_at, fingerprint) "
                         "VALUES (?, ?, ?, ?, '2026-01-01', ?)", (key_id, text, status, median, f"fp{i}"))
    conn.close()
    with TuningCache(path) as c, c._write() as w:
        c._recompute_best(w)


def make_bad_files(tmp: Path) -> dict[str, Path]:
    """One file of each kind the runtime must skip: not SQLite, foreign SQLite, newer schema."""
    garbage = tmp / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database\n" * 64)
    foreign = tmp / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    newer = tmp / "newer.sqlite"
    with TuningCache(newer) as c:
        c.record_trial(key(), cfg(), "ok", median_ms=1.0)
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    return {"garbage": garbage, "foreign": foreign, "newer": newer}


def test_schema_header_and_wal(tmp_path):
    path = tmp_path / "sub" / "t.sqlite"
    with TuningCache(path) as c:
        assert c.counts() == {"keys": 0, "trials": 0, "best": 0}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "result_keys", "trials", "best", "kernel_sources"} <= tables
    conn.close()
    with TuningCache(path, readonly=True) as c:  # reopening an existing file works read-only too
        assert c.verify() == []


def test_readonly_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        TuningCache(tmp_path / "nope.sqlite", readonly=True)
    assert not (tmp_path / "nope.sqlite").exists()


def test_result_key_for_spec_and_validation():
    k = key(128)
    assert (k.spec, k.bucket, k.device) == (SPEC, 128, device_info().name)
    assert len(k.template_hash) == 16 and len(k.space_hash) == 16
    with pytest.raises(ValueError, match="power of two"):
        ResultKey.for_spec(SPEC, 100, device_info())
    with pytest.raises(ValueError, match=r"ResultKey\.n_heads must be a positive integer"):
        key(128, n_heads=0).validate()
    # The flat row (SQL columns, export objects) is the spec's fields, then the rest, and reads back.
    from flashmhf.cache.store import KEY_FIELDS

    assert KEY_FIELDS[:7] == ("kind", "n_heads", "n_kv_heads", "head_dim", "n_experts", "expert_dim", "dtype")
    assert k.to_dict()["n_heads"] == 2 and list(k.to_dict()) == list(KEY_FIELDS)
    assert ResultKey.from_dict(k.to_dict()) == k and ResultKey.from_columns(k.columns()) == k
    assert sorted([key(256), key(64), key(128, dtype="bf16")]) == [key(128, dtype="bf16"), key(64), key(256)]


def test_record_and_best_selection(tmp_path):
    k = key()
    with TuningCache(tmp_path / "t.sqlite") as c:
        assert c.best(k) is None
        c.record_trial(k, cfg(), "ok", median_ms=2.0, p20_ms=1.9, p80_ms=2.1, torch_version="2.x", source="test")
        c.record_trial(k, cfg(block_f=32), "ok", median_ms=1.0)
        c.record_trial(k, cfg(split=2), "compile-error", error="boom")
        c.record_trial(k, cfg(split=4), "out-of-resources")
        c.record_trial(k, cfg(num_warps=8), "wrong-result", median_ms=0.01)  # timed but wrong: never best
        best = c.best(k)
        assert best.config == cfg(block_f=32) and best.median_ms == 1.0 and best.ok
        c.record_trial(k, cfg(block_f=32), "ok", median_ms=1.5)  # slower re-run: best row unchanged
        assert c.best(k).median_ms == 1.0
        c.record_trial(k, cfg(block_m=32), "ok", median_ms=0.5)
        assert c.best(k).config == cfg(block_m=32)
        # A config that once gave a wrong result or crashed is never best, whatever else it did.
        c.record_trial(k, cfg(block_m=32), "wrong-result")
        assert c.best(k).config == cfg(block_f=32)
        c.record_trial(k, cfg(num_warps=8), "ok", median_ms=0.001)
        assert c.best(k).config == cfg(block_f=32)
        c.record_trial(k, cfg(block_f=32), "crash", error="illegal memory access")
        assert c.best(k).config == cfg()
        trials = c.trials(k)
        assert len(trials) == 10 and trials[0].p20_ms == 1.9 and trials[0].source == "test"
        assert trials[0].host and trials[0].recorded_at and trials[0].key == k
        assert c.verify() == []


def test_record_trial_rejects_bad_input(tmp_path):
    with TuningCache(tmp_path / "t.sqlite") as c:
        with pytest.raises(ValueError, match="status"):
            c.record_trial(key(), cfg(), "fast")
        with pytest.raises(ValueError, match="median_ms"):
            c.record_trial(key(), cfg(), "ok")
        with pytest.raises(ValueError, match="median_ms"):
            c.record_trial(key(), cfg(), "ok", median_ms=float("nan"))
        with pytest.raises(ValueError, match="config"):
            c.record_trial(key(), ["not", "a", "dict"], "ok", median_ms=1.0)
        assert c.counts()["trials"] == 0


def test_keys_filters_measured_configs_and_delete(tmp_path):
    with TuningCache(tmp_path / "t.sqlite") as c:
        old_space = key(64, space_hash="0" * 16)
        c.record_trial(old_space, cfg(), "ok", median_ms=3.0)
        c.record_trial(old_space, cfg(split=2), "wrong-result")
        c.record_trial(key(64), cfg(block_f=32), "ok", median_ms=2.0)
        c.record_trial(key(64), cfg(block_f=32), "ok", median_ms=1.0)
        c.record_trial(key(256, dtype="bf16"), cfg(), "ok", median_ms=1.0)
        assert len(c.keys()) == 3
        assert c.keys(dtype="bf16") == [key(256, dtype="bf16")]
        assert len(c.keys(bucket=[64, 256])) == 3 and c.keys(bucket=[]) == []
        with pytest.raises(ValueError, match="filter must be one of"):
            c.keys(colour="red")
        measured = c.measured_configs(key(64))
        assert set(measured) == {canonical_config(cfg()), canonical_config(cfg(split=2)),
                                 canonical_config(cfg(block_f=32))}
        assert measured[canonical_config(cfg(block_f=32))].median_ms == 1.0
        assert measured[canonical_config(cfg(split=2))].status == "wrong-result"
        assert set(c.measured_configs(key(64), ignore_space_hash=False)) == {canonical_config(cfg(block_f=32))}
        assert c.delete(dtype="bf16") == 1
        assert c.delete(space_hash="0" * 16) == 2
        assert c.keys() == [key(64)] and c.verify() == []


def test_kernel_source_is_stored_and_checked(tmp_path):
    with TuningCache(tmp_path / "t.sqlite") as c:
        c.record_source(SPEC)
        assert "def launch" in c.kernel_source(SPEC)
        assert c.verify() == []
        c.record_source(SPEC, source="print('tampered')\n")
        assert any("differs from a fresh render" in p for p in c.verify())
        c.conn.execute("UPDATE kernel_sources SET source = 'x'")
        assert any("checksum mismatch" in p for p in c.verify())


def test_verify_flags_stale_and_inconsistent_best(tmp_path):
    path = tmp_path / "t.sqlite"
    with TuningCache(path) as c:
        c.record_trial(key(template_hash="feedfacefeedface"), cfg(), "ok", median_ms=1.0)
        c.record_trial(key(), cfg(), "ok", median_ms=1.0)
        errors, warnings = c.check()
        assert errors == [] and any("stale" in w and "feedfacefeedface" in w for w in warnings)
        c.conn.execute("UPDATE best SET median_ms = 7.0")
        errors, _ = c.check()
        assert any("best of key" in e for e in errors)


# ---- bad files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which,message", [
    ("garbage", "not a usable SQLite file"),
    ("foreign", "not a flashmhf tuning cache"),
    ("newer", "newer than this flashmhf supports"),
])
def test_bad_files_raise_cache_file_error(tmp_path, which, message):
    path = make_bad_files(tmp_path)[which]
    before = path.read_bytes()
    for readonly in (True, False):
        with pytest.raises(CacheFileError, match=message) as info:
            TuningCache(path, readonly=readonly)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before  # never "repaired" or overwritten


def test_empty_file_readonly_is_not_ours_but_can_be_initialised(tmp_path):
    path = tmp_path / "empty.sqlite"
    path.touch()
    with pytest.raises(CacheFileError, match="empty"):
        TuningCache(path, readonly=True)
    with TuningCache(path) as c:
        assert c.verify() == []


# ---- merge and JSON -------------------------------------------------------------------------------


def test_merge_dedups_and_recomputes_best(tmp_path):
    a, b = TuningCache(tmp_path / "a.sqlite"), TuningCache(tmp_path / "b.sqlite")
    a.record_trial(key(), cfg(), "ok", median_ms=2.0)
    b.merge_from(a.path)  # b now holds a's trial, identical
    b.record_trial(key(), cfg(block_f=32), "ok", median_ms=1.0)
    b.record_trial(key(128), cfg(), "compile-error", error="x")
    b.record_source(SPEC)
    assert a.merge_from(b.path) == (2, [])
    assert a.merge_from(b.path) == (0, [])
    assert a.counts() == {"keys": 2, "trials": 3, "best": 1}
    assert a.best(key()).config == cfg(block_f=32)
    assert a.kernel_source(SPEC) == b.kernel_source(SPEC)
    assert a.verify() == []
    # A disqualifying trial arriving by merge removes the config from best.
    b.record_trial(key(), cfg(block_f=32), "wrong-result")
    assert a.merge_from(b.path) == (1, []) and a.best(key()).config == cfg()
    a.close(), b.close()


def test_export_import_round_trip(tmp_path):
    src = TuningCache(tmp_path / "src.sqlite")
    src.record_trial(key(), cfg(), "ok", median_ms=2.0, p20_ms=1.5, p80_ms=2.5, torch_version="2.9")
    src.record_trial(key(), cfg(block_f=32), "ok", median_ms=1.25)
    src.record_trial(key(), cfg(split=2), "crash", error="context lost")
    src.record_trial(key(32, dtype="bf16"), cfg(), "ok", median_ms=0.5)
    out = tmp_path / "export.json"
    assert export_json(src, out) == 4
    doc = json.loads(out.read_text())
    assert doc["format"] == "flashmhf-tuning-cache" and len(doc["results"]) == 2
    buf = io.StringIO()
    assert export_json(src, buf, dtype="bf16") == 1

    dst = TuningCache(tmp_path / "dst.sqlite")
    assert import_json(dst, out) == 4
    assert import_json(dst, out) == 0
    assert dst.keys() == src.keys()
    for k in src.keys():
        strip = lambda ts: [dataclasses.replace(t, id=None) for t in ts]
        assert strip(dst.trials(k)) == strip(src.trials(k))
        assert dst.best(k).config == src.best(k).config
    assert import_json(dst, io.StringIO(buf.getvalue())) == 0
    assert dst.verify() == []


@pytest.mark.parametrize("doc,message", [
    ("[1, 2]", "not a flashmhf tuning-cache export"),
    ('{"format": "flashmhf-tuning-cache", "schema_version": 99, "results": []}', "schema_version"),
    ('{"format": "flashmhf-tuning-cache", "schema_version": 1, "results": [{"key": {"kind": "fwd"}, "trials": []}]}',
     r"results\[0\]\.key"),
    ("{not json", "not JSON"),
])
def test_import_rejects_bad_documents(tmp_path, doc, message):
    with TuningCache(tmp_path / "t.sqlite") as c:
        with pytest.raises(ValueError, match=message):
            import_json(c, io.StringIO(doc))


def test_import_names_the_bad_trial(tmp_path):
    with TuningCache(tmp_path / "t.sqlite") as c:
        c.record_trial(key(), cfg(), "ok", median_ms=1.0)
        doc = json.loads(_export(c))
        doc["results"][0]["trials"][0]["status"] = "great"
        with pytest.raises(ValueError, match=r"results\[0\]\.trials\[0\]\.status"):
            import_json(c, io.StringIO(json.dumps(doc)))


def _export(c: TuningCache) -> str:
    buf = io.StringIO()
    export_json(c, buf)
    return buf.getvalue()


# ---- several writers, SIGKILL ---------------------------------------------------------------------


def _writer(path: str, worker: int, n: int) -> None:
    import random

    rng = random.Random(worker)
    with TuningCache(path) as c:
        for i in range(n):
            k = key(64 if i % 2 else 128)
            c.record_trial(k, cfg(block_m=16 * 2 ** (i % 4), split=1 + worker), "ok", median_ms=rng.uniform(0.1, 10.0),
                           source=f"w{worker}")
            if i % 10 == 0:
                c.record_trial(k, cfg(num_warps=8), "compile-error", error=f"w{worker}-{i}")


def test_two_processes_write_one_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")  # created by whichever writer comes first
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 150)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with TuningCache(path, readonly=True) as c:
        assert c.counts()["trials"] == 2 * (150 + 15)
        assert c.verify() == []
        for k in c.keys():
            oks = [t.median_ms for t in c.trials(k) if t.ok]
            assert c.best(k).median_ms == min(oks)


KILLED_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from tests.test_cache_store import cfg, key
    from flashmhf.cache.store import TuningCache
    c = TuningCache({path!r})
    i = 0
    while True:
        i += 1
        c.record_trial(key(2 ** (i % 6)), cfg(block_m=16 * 2 ** (i % 4)), "ok", median_ms=1000.0 / i)
        if i % 50 == 0:
            c.merge_from({other!r})  # a bigger transaction to be killed in, too
""")


def test_sigkill_mid_writes_leaves_a_consistent_file(tmp_path):
    path, other = tmp_path / "killed.sqlite", tmp_path / "other.sqlite"
    with TuningCache(other) as o:
        for i in range(200):
            o.record_trial(key(16), cfg(split=1 + i % 2), "ok", median_ms=float(i + 1))
    script = KILLED_WRITER.format(repo=str(REPO), path=str(path), other=str(other))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            time.sleep(0.2)
            assert proc.poll() is None, proc.stderr.read().decode()
            if path.exists():
                try:
                    with TuningCache(path, readonly=True) as c:
                        if c.counts()["trials"] > 300:
                            break
                except (CacheFileError, sqlite3.OperationalError):
                    pass  # still being created
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with TuningCache(path) as c:  # the writer's WAL is recovered by the next opener
        assert c.verify() == []
        assert c.counts()["trials"] > 300
        for k in c.keys():
            oks = [t.median_ms for t in c.trials(k) if t.ok]
            assert c.best(k).median_ms == min(oks)


def test_copy_to_writes_a_single_file_cache(tmp_path):
    with TuningCache(tmp_path / "src.sqlite") as c:
        c.record_trial(key(), cfg(), "ok", median_ms=2.0)
        c.record_trial(key(), cfg(block_f=32), "ok", median_ms=1.0)
        c.record_trial(key(dtype="bf16"), cfg(), "ok", median_ms=1.0)
        c.record_source(SPEC)
        c.record_source(dataclasses.replace(SPEC, dtype="bf16"))
        dest = tmp_path / "nvidia-h200.sqlite"
        assert c.copy_to(dest, dtype="fp32") == 2
        with pytest.raises(ValueError, match="already exists"):
            c.copy_to(dest)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("nvidia")) == ["nvidia-h200.sqlite"]
    with sqlite3.connect(dest) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with TuningCache(dest, readonly=True) as shipped:
        assert shipped.keys() == [key()] and shipped.best(key()).config == cfg(block_f=32)
        assert shipped.kernel_source(SPEC) and shipped.kernel_source(dataclasses.replace(SPEC, dtype="bf16")) is None
        assert shipped.verify() == []


def _record_in_child(c: TuningCache) -> None:
    c.record_trial(key(), cfg(block_f=32), "ok", median_ms=1.0)  # the inherited object reconnects


def test_cache_object_survives_fork(tmp_path):
    c = TuningCache(tmp_path / "t.sqlite")
    c.record_trial(key(), cfg(), "ok", median_ms=2.0)
    child = multiprocessing.get_context("fork").Process(target=_record_in_child, args=(c,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    c.record_trial(key(), cfg(split=2), "ok", median_ms=3.0)
    assert c.counts()["trials"] == 3 and c.best(key()).config == cfg(block_f=32) and c.verify() == []
    c.close()
