"""The tuned caches shipped inside the package: single files (a rollback journal, not WAL, so they
read from a read-only site-packages) that pass `flashmhf cache verify`."""

import sqlite3
from pathlib import Path

from click.testing import CliRunner

import flashmhf.cache
from flashmhf.cli.app import main

SHIPPED = sorted((Path(flashmhf.cache.__file__).parent / "shipped").glob("*.sqlite"))


def test_there_is_a_shipped_cache():
    assert [p.name for p in SHIPPED] == ["nvidia-h200.sqlite"]


def test_shipped_caches_are_single_files_that_verify():
    for path in SHIPPED:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete", path
        finally:
            conn.close()
        result = CliRunner().invoke(main, ["cache", "verify", "--cache", str(path)])
        assert result.exit_code == 0 and "ok" in result.output, result.output
