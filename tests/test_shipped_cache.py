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


def test_shipped_configs_were_tuned_on_the_current_templates():
    # A template edit stales its kind's tuned configs (they silently fall back to defaults):
    # re-tune on the GPU before shipping.
    from flashmhf.codegen.render import template_hash

    for path in SHIPPED:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT DISTINCT k.kind, k.template_hash FROM best b "
                                "JOIN result_keys k ON k.id = b.key_id").fetchall()
        finally:
            conn.close()
        assert rows, path
        stale = [(kind, h) for kind, h in rows if h != template_hash(kind)]
        assert not stale, f"{path.name}: stale configs {stale}"
