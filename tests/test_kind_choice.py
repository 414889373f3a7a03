"""Which kind runs a role: the registry's preference, overruled by tuned times measured on the device."""

from __future__ import annotations

import pytest
import torch

import flashmhf_runtime
from flashmhf.cache import paths
from flashmhf.cache.device import DeviceInfo, device_info
from flashmhf.cache.lookup import demote, tuned_times
from flashmhf.cache.store import ResultKey, TuningCache
from flashmhf.codegen import Spec, get_kind
from flashmhf.codegen.arch import arch_for_capability
from flashmhf.codegen.kinds import DKUV, FORWARD
from flashmhf_runtime import op
from tests.helpers import REPO_128M, isolated_caches, pretend_gpu

GPU = "pretend-h200"
CUDA = torch.device("cuda", 0)
SHAPE = (*REPO_128M, "bf16")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    yield from isolated_caches(tmp_path, monkeypatch)


@pytest.fixture
def hopper(monkeypatch):
    pretend_gpu(monkeypatch, op, "9.0", GPU)


def gpu_info() -> DeviceInfo:
    here = device_info()
    return DeviceInfo(GPU, "9.0", here.triton_version, here.torch_version)


def record(kind: str, times: dict[int, float], device: DeviceInfo | None = None, path=None) -> None:
    """Tuned results of ``kind`` for SHAPE: bucket -> median ms, with the kind's default config."""
    device = device or gpu_info()
    spec = Spec(kind, *SHAPE)
    with TuningCache(path or paths.user_cache_path()) as cache:
        for bucket, ms in times.items():
            config = get_kind(kind).default(spec, bucket, arch_for_capability("9.0"))
            cache.record_trial(ResultKey.for_spec(spec, bucket, device), config, "ok", median_ms=ms)
    flashmhf_runtime.reset()


def test_preference_decides_without_times(hopper):
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd_ws"
    assert op.kind_for(FORWARD, SHAPE, 1023, CUDA) == "fwd_ws_split"  # below fwd_ws's minimum
    assert op.kind_for(FORWARD, SHAPE, 255, CUDA) == "fwd"  # below fwd_ws_split's too
    assert op.kind_for(FORWARD, SHAPE, 4097, CUDA) == "fwd_ws"  # above fwd_ws_split's maximum


def test_the_kind_measured_faster_runs(hopper):
    record("fwd", {1024: 0.044, 4096: 0.130})
    record("fwd_ws", {1024: 0.128, 4096: 0.108})
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd"
    assert op.kind_for(FORWARD, SHAPE, 4096, CUDA) == "fwd_ws"
    assert op.kind_for(FORWARD, SHAPE, 3000, CUDA) == "fwd_ws"  # bucket 4096
    assert op.kind_for(FORWARD, SHAPE, 2048, CUDA) == "fwd_ws"  # 1024 and 4096 equally near: the larger
    assert op.kind_for(FORWARD, SHAPE, 1 << 20, CUDA) == "fwd_ws"  # nearest tuned: 4096
    assert op.kernel_kinds(REPO_128M + ("bf16",), 1024, CUDA)["forward"] == "fwd"


def test_times_at_no_shared_bucket_leave_the_preference(hopper):
    record("fwd", {64: 0.01, 256: 0.02})
    record("fwd_ws", {4096: 0.5})
    assert op.kind_for(FORWARD, SHAPE, 4096, CUDA) == "fwd_ws"


def test_a_kind_without_times_is_not_displaced(hopper):
    record("fwd", {1024: 0.01})
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd_ws"


def test_disabled_and_unable_kinds_are_never_chosen(hopper, monkeypatch):
    record("fwd", {1024: 0.5})
    record("fwd_ws", {1024: 0.1})
    monkeypatch.setattr(op, "DISABLED_KINDS", {"fwd_ws", "fwd_ws_split"})
    flashmhf_runtime.reset()
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd"
    monkeypatch.setattr(op, "DISABLED_KINDS", set())
    flashmhf_runtime.reset()
    assert op.kind_for(FORWARD, SHAPE, 200, CUDA) == "fwd"  # fwd_ws needs 1024 tokens, however fast


def test_another_gpus_times_do_not_count(hopper):
    other = DeviceInfo("other-gpu", "9.0", gpu_info().triton_version, gpu_info().torch_version)
    record("fwd", {1024: 0.01}, other)
    record("fwd_ws", {1024: 0.5}, other)
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd_ws"


def test_backward_roles_choose_by_time_too(hopper):
    key = (8, 8, 128, 8, 256, "bf16")  # bwd_dkuv_ws takes d_h = 128 at any token count
    for kind, ms in (("bwd_dkuv", 0.08), ("bwd_dkuv_ws", 0.14)):
        spec = Spec(kind, *key)
        with TuningCache(paths.user_cache_path()) as cache:
            cache.record_trial(ResultKey.for_spec(spec, 1024, gpu_info()),
                               get_kind(kind).default(spec, 1024, arch_for_capability("9.0")), "ok", median_ms=ms)
    flashmhf_runtime.reset()
    assert op.kind_for(DKUV, key, 1024, CUDA) == "bwd_dkuv"
    assert op.kind_for(DKUV, key, 16, CUDA) == "bwd_dkuv"  # nearest shared bucket: 1024


def test_tuned_times_follow_file_order_and_demotion(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.sqlite"
    monkeypatch.setattr(paths, "shipped_cache_paths", lambda: [shipped])
    record("fwd", {1024: 0.3, 64: 0.02}, path=shipped)
    record("fwd", {1024: 0.1})
    spec = Spec("fwd", *SHAPE)
    assert tuned_times(spec, gpu_info()) == {1024: 0.1, 64: 0.02}  # user file first, then shipped
    user_config = get_kind("fwd").default(spec, 1024, arch_for_capability("9.0"))
    demote(spec, 1024, gpu_info(), user_config, "failed to compile")
    assert tuned_times(spec, gpu_info()) == {64: 0.02}  # both files' 1024 rows hold the demoted config


def test_the_choice_is_memoised_per_call_signature_until_reset(hopper, monkeypatch):
    from flashmhf.codegen import registry

    record("fwd", {1024: 0.5})
    record("fwd_ws", {1024: 0.1})
    asked = []
    real = registry.candidates
    monkeypatch.setattr(registry, "candidates", lambda *a, **k: asked.append(a[2]) or real(*a, **k))
    assert [op.kind_for(FORWARD, SHAPE, 1024, CUDA) for _ in range(3)] == ["fwd_ws"] * 3
    assert asked == [1024]  # worked out once
    assert op.kind_for(FORWARD, SHAPE, 200, CUDA) == "fwd" and asked == [1024, 200]  # another token count
    monkeypatch.setattr(op, "DISABLED_KINDS", {"fwd_ws", "fwd_ws_split"})  # part of the signature: no reset
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd"
    monkeypatch.setattr(op, "DISABLED_KINDS", set())
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd_ws" and asked == [1024, 200, 1024]
    record("fwd", {1024: 0.01})  # new tuned times, then reset() (as `flashmhf tune` does): chosen again
    assert op.kind_for(FORWARD, SHAPE, 1024, CUDA) == "fwd" and asked == [1024, 200, 1024, 1024]


def test_tuned_times_take_a_files_fastest_row_of_a_bucket():
    """A file may hold a bucket under two keys (tuned in an earlier config space, then again): the
    kind choice compares the fastest, as the config lookup runs it."""
    import dataclasses

    spec = Spec("fwd", *SHAPE)
    config = get_kind("fwd").default(spec, 1024, arch_for_capability("9.0"))
    key = ResultKey.for_spec(spec, 1024, gpu_info())
    with TuningCache(paths.user_cache_path()) as cache:
        cache.record_trial(dataclasses.replace(key, space_hash="earlier-space"), config, "ok", median_ms=0.3)
        cache.record_trial(key, config, "ok", median_ms=0.1)
    flashmhf_runtime.reset()
    assert tuned_times(spec, gpu_info()) == {1024: 0.1}
