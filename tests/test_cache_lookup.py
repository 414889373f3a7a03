"""Runtime lookup: file order, nearest bucket, provenance, check_config, demotion, bad files."""

from __future__ import annotations

import warnings

import pytest

import flashmhf_runtime
from flashmhf.cache import paths
from flashmhf.cache.device import device_info
from flashmhf.cache.lookup import CacheWarning, demote, find_config
from flashmhf.cache.store import TuningCache
from flashmhf_runtime import dispatch
from tests.helpers import isolated_caches
from tests.test_cache_store import SPEC, cfg, key, make_bad_files, plant


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    yield from isolated_caches(tmp_path, monkeypatch)


def write(path, *rows) -> None:
    """rows: (key, config, median_ms)."""
    with TuningCache(path) as c:
        for k, config, ms in rows:
            c.record_trial(k, config, "ok", median_ms=ms)


def dev():
    return device_info()


def test_miss_without_files():
    assert paths.cache_files_in_effect() == [(paths.user_cache_path(), "user")]
    assert find_config(SPEC, 64, dev()) is None
    assert not paths.user_cache_path().exists()  # lookup never creates files


def test_overlay_beats_user_beats_shipped(tmp_path, monkeypatch):
    shipped, overlay = tmp_path / "shipped.sqlite", tmp_path / "overlay.sqlite"
    write(shipped, (key(), cfg(block_f=32), 1.0))
    monkeypatch.setattr(paths, "shipped_cache_paths", lambda: [shipped])
    config, where = find_config(SPEC, 64, dev())
    assert config == cfg(block_f=32) and where == f"shipped:{shipped} bucket 64"

    write(paths.user_cache_path(), (key(), cfg(num_warps=8), 1.0))
    flashmhf_runtime.reset()
    config, where = find_config(SPEC, 64, dev())
    assert config == cfg(num_warps=8) and where.startswith("user:")

    write(overlay, (key(), cfg(num_stages=2), 1.0))
    monkeypatch.setenv("FLASHMHF_CACHE", f"{tmp_path / 'missing.sqlite'}:{overlay}")
    flashmhf_runtime.reset()
    with pytest.warns(CacheWarning, match="does not exist"):
        config, where = find_config(SPEC, 64, dev())
    assert config == cfg(num_stages=2) and where == f"FLASHMHF_CACHE:{overlay} bucket 64"
    assert [role for _, role in paths.cache_files_in_effect()] == ["FLASHMHF_CACHE"] * 2 + ["user", "shipped"]


def test_an_exact_bucket_in_a_later_file_beats_a_nearer_file_of_other_buckets(tmp_path, monkeypatch):
    overlay = tmp_path / "overlay.sqlite"
    write(overlay, (key(16), cfg(split=2), 1.0))
    write(paths.user_cache_path(), (key(64), cfg(), 1.0), (key(1024), cfg(num_warps=8), 1.0))
    monkeypatch.setenv("FLASHMHF_CACHE", str(overlay))
    config, where = find_config(SPEC, 64, dev())  # measured at 64 in the user's file: used
    assert config == cfg() and where.startswith("user:") and where.endswith("bucket 64")
    config, where = find_config(SPEC, 16, dev())  # the overlay's own bucket: the overlay's
    assert config == cfg(split=2) and where.startswith("FLASHMHF_CACHE:")
    config, where = find_config(SPEC, 4, dev())  # nearest of all files' buckets: 16 (overlay)
    assert config == cfg(split=2) and where.endswith("bucket 16")
    write(overlay, (key(64), cfg(num_stages=2), 1.0))
    flashmhf_runtime.reset()
    config, where = find_config(SPEC, 64, dev())  # the same bucket in both: the earlier file's
    assert config == cfg(num_stages=2) and where.startswith("FLASHMHF_CACHE:")


def test_nearest_bucket_in_log_space():
    write(paths.user_cache_path(), (key(16), cfg(split=2), 1.0), (key(1024), cfg(num_warps=8), 1.0))
    assert find_config(SPEC, 16, dev())[0] == cfg(split=2)
    assert find_config(SPEC, 64, dev())[1].endswith("bucket 16")  # log2 distance 2 vs 4
    assert find_config(SPEC, 256, dev())[1].endswith("bucket 1024")  # 4 vs 2
    assert find_config(SPEC, 128, dev())[1].endswith("bucket 1024")  # tie: the larger bucket
    assert find_config(SPEC, 1 << 20, dev())[1].endswith("bucket 1024")


def test_other_shape_dtype_or_device_is_a_miss():
    write(paths.user_cache_path(), (key(64, dtype="bf16"), cfg(), 1.0), (key(64, device="nvidia-h200"), cfg(), 1.0),
          (key(64, capability="9.0"), cfg(), 1.0), (key(64, n_experts=4), cfg(), 1.0))
    assert find_config(SPEC, 64, dev()) is None


def test_other_template_not_used_and_warned_once():
    write(paths.user_cache_path(), (key(64, template_hash="feedfacefeedface"), cfg(), 1.0))
    with pytest.warns(CacheWarning, match="not used.*flashmhf tune .*--tokens 64"):
        assert find_config(SPEC, 64, dev()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_config(SPEC, 64, dev()) is None  # memoised
        assert find_config(SPEC, 128, dev()) is None  # same spec and device: warned already


def test_other_triton_version_is_used_with_one_line_suggesting_tune():
    write(paths.user_cache_path(), (key(64, triton_version="0.0.1"), cfg(split=2), 1.0))
    with pytest.warns(CacheWarning, match="tuned under Triton 0.0.1.*flashmhf tune .*--tokens 64"):
        config, where = find_config(SPEC, 64, dev())
    assert config == cfg(split=2) and where.endswith("bucket 64 (Triton 0.0.1)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_config(SPEC, 128, dev())[0] == cfg(split=2)  # same spec and device: said once


def test_running_triton_beats_another_version_in_an_earlier_file(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.sqlite"
    write(shipped, (key(16), cfg(num_warps=8), 1.0))
    monkeypatch.setattr(paths, "shipped_cache_paths", lambda: [shipped])
    write(paths.user_cache_path(), (key(64, triton_version="0.0.1"), cfg(split=2), 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, where = find_config(SPEC, 64, dev())
    assert config == cfg(num_warps=8) and where == f"shipped:{shipped} bucket 16"


def test_other_triton_result_must_pass_the_architecture_check():
    from flashmhf.codegen.arch import SM80, SM90

    write(paths.user_cache_path(), (key(1024, triton_version="0.0.1"), cfg(tma=1), 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        assert find_config(SPEC, 1024, dev(), SM90)[0] == cfg(tma=1)
        assert find_config(SPEC, 1024, dev(), SM80) is None  # an A100 has no TMA


def test_usable_result_is_used_beside_a_stale_one():
    write(paths.user_cache_path(), (key(64, template_hash="feedfacefeedface"), cfg(split=2), 0.1),
          (key(64), cfg(), 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_config(SPEC, 64, dev())[0] == cfg()


def test_config_failing_check_config_is_skipped():
    bad_block = cfg(block_f=64)  # does not divide expert_dim 32
    bad_keys = {**cfg(), "colour": 3}
    write(paths.user_cache_path(), (key(64), bad_block, 0.1), (key(256), cfg(), 1.0))
    plant(paths.user_cache_path(), [(key(32).to_dict(), bad_keys, "ok", 0.1)])
    with pytest.warns(CacheWarning) as record:
        config, where = find_config(SPEC, 64, dev())
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2, messages  # each said once
    assert "rejected for fwd" in messages[0] and "block_f=64" in messages[0]
    assert "1 unusable tuned row(s) skipped" in messages[1] and "colour" in messages[1]
    assert config == cfg() and where.endswith("bucket 256")


def test_nearest_bucket_config_must_fit_the_requested_tokens():
    # block_m 128 is fine at 1024 tokens but larger than the rows of 4 tokens: not borrowed there.
    write(paths.user_cache_path(), (key(1024), cfg(block_m=128), 1.0))
    assert find_config(SPEC, 1024, dev())[0] == cfg(block_m=128)
    assert find_config(SPEC, 4, dev()) is None


def test_demote_falls_back_to_next_result():
    write(paths.user_cache_path(), (key(64), cfg(), 1.0), (key(128), cfg(num_warps=8), 1.0))
    assert find_config(SPEC, 64, dev())[0] == cfg()
    demote(SPEC, 64, dev(), cfg(), "compile error")
    config, where = find_config(SPEC, 64, dev())
    assert config == cfg(num_warps=8) and where.endswith("bucket 128")
    demote(SPEC, 64, dev(), cfg(num_warps=8), "launch error")
    assert find_config(SPEC, 64, dev()) is None
    with TuningCache(paths.user_cache_path(), readonly=True) as c:
        assert c.counts()["trials"] == 2  # demotion writes nothing


def test_rows_read_once_until_invalidate():
    write(paths.user_cache_path(), (key(64), cfg(), 1.0))
    assert find_config(SPEC, 64, dev())[0] == cfg()
    assert find_config(SPEC, 128, dev())[0] == cfg()  # another bucket: no new file read
    paths.user_cache_path().unlink()
    assert find_config(SPEC, 32, dev())[0] == cfg()
    flashmhf_runtime.reset()
    assert find_config(SPEC, 64, dev()) is None


def test_returned_config_is_a_copy():
    write(paths.user_cache_path(), (key(64), cfg(), 1.0))
    find_config(SPEC, 64, dev())[0]["block_m"] = 999
    assert find_config(SPEC, 64, dev())[0] == cfg()


@pytest.mark.parametrize("which", ["garbage", "foreign", "newer"])
def test_bad_file_is_reported_once_and_skipped(tmp_path, monkeypatch, which):
    bad = make_bad_files(tmp_path)[which]
    write(paths.user_cache_path(), (key(64), cfg(), 1.0))
    monkeypatch.setenv("FLASHMHF_CACHE", str(bad))
    with pytest.warns(CacheWarning, match=f"skipping tuning cache .*{bad.name}"):
        config, where = find_config(SPEC, 64, dev())
    assert config == cfg() and where.startswith("user:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_config(SPEC, 128, dev())[0] == cfg()


def test_truncated_file_is_skipped(tmp_path, monkeypatch):
    bad = tmp_path / "truncated.sqlite"
    with TuningCache(bad) as c:
        for b in range(12):
            for i in range(40):
                c.record_trial(key(2**b), cfg(block_m=16 * 2 ** (i % 4)), "ok", median_ms=1.0 + i, error="x" * 200)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    for suffix in ("-wal", "-shm"):
        bad.with_name(bad.name + suffix).unlink(missing_ok=True)
    monkeypatch.setenv("FLASHMHF_CACHE", str(bad))
    with pytest.warns(CacheWarning, match="skipping tuning cache"):
        assert find_config(SPEC, 64, dev()) is None


def test_dispatch_uses_the_cache():
    write(paths.user_cache_path(), (key(64), cfg(split=2), 1.0))
    config, where = dispatch.choose_config(SPEC, 50, dev())
    assert config == cfg(split=2) and where.endswith("bucket 64")
