"""The tuned caches shipped inside the package: single files (a rollback journal, not WAL, so they
read from a read-only site-packages) that pass `flashmhf cache verify`."""

import json
import sqlite3
import warnings
from pathlib import Path
from unittest import mock

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


def test_shipped_configs_stay_in_use_on_their_gpu_and_under_another_triton(tmp_path, monkeypatch):
    # The runtime keys results by template hash and Triton version, not by the search space's hash
    # (which changes with any edit of a kind's module): every shipped best row must be what the
    # runtime picks on its GPU, and still under a newer Triton (with one note suggesting a re-tune).
    from flashmhf.cache import lookup, paths
    from flashmhf.cache.device import DeviceInfo
    from flashmhf.codegen import Spec
    from flashmhf.codegen.arch import SM90

    monkeypatch.setenv("FLASHMHF_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASHMHF_CACHE", raising=False)
    for path in SHIPPED:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT k.kind, k.n_heads, k.n_kv_heads, k.head_dim, k.n_experts, k.expert_dim, k.dtype, k.bucket, "
                "k.device, k.capability, k.triton_version, b.median_ms, t.config FROM best b "
                "JOIN result_keys k ON k.id = b.key_id JOIN trials t ON t.id = b.trial_id").fetchall()
        finally:
            conn.close()
        monkeypatch.setattr(paths, "shipped_cache_paths", lambda path=path: [path])
        fastest: dict[tuple, tuple[float, dict]] = {}  # per key but the space hash: the row the runtime picks
        for *key, median, config in rows:
            if tuple(key) not in fastest or median < fastest[tuple(key)][0]:
                fastest[tuple(key)] = (median, json.loads(config))
        by_spec: dict[tuple, list] = {}  # the note on another Triton comes once per spec and device
        for (*spec, bucket, device, capability, triton_version), (_, config) in fastest.items():
            by_spec.setdefault((*spec, device, capability, triton_version), []).append((bucket, config))
        for (*spec, device, capability, triton_version), buckets in by_spec.items():
            for running in (triton_version, "9.9.9"):
                lookup.invalidate()
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    for bucket, config in buckets:
                        found = lookup.find_config(Spec(*spec), bucket,
                                                   DeviceInfo(device, capability, running, "2.11.0"), SM90)
                        assert found is not None, (spec, bucket, running)
                        assert found[0] == config and f"bucket {bucket}" in found[1], (spec, bucket, found)
                assert [str(w.message) for w in said if "tuned under Triton" in str(w.message)] == (
                    [] if running == triton_version else [mock.ANY])
    lookup.invalidate()


def test_the_h200_cache_holds_every_key_the_tuning_phases_name():
    """Every preset in bf16 and fp16: each kind the runtime runs at each bucket it serves
    (flashmhf.tuner.phases, what scripts/tune_preset.sh tunes), on the installed templates."""
    from flashmhf.codegen import template_hash
    from flashmhf.codegen.arch import SM90
    from flashmhf.tuner.phases import jobs
    from flashmhf_runtime.presets import PRESETS

    path = next(p for p in SHIPPED if p.name == "nvidia-h200.sqlite")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        held = set(conn.execute(
            "SELECT k.kind, k.n_heads, k.n_kv_heads, k.head_dim, k.n_experts, k.expert_dim, k.dtype, k.bucket, "
            "k.template_hash FROM best b JOIN result_keys k ON k.id = b.key_id"))
    finally:
        conn.close()
    wanted = [(spec, bucket) for p in PRESETS.values() for dtype in ("bf16", "fp16")
              for spec, bucket in jobs(p, dtype, SM90)]
    assert {spec.kind for spec, _ in wanted} >= {"fwd_ws_split", "norm_router_core", "bwd_dkuv_ws"}
    missing = [(spec.label(), bucket) for spec, bucket in wanted
               if (*spec.as_tuple(), bucket, template_hash(spec.kind)) not in held]
    assert not missing, missing
