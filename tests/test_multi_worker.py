"""Several tuning workers on one shared Optuna journal and one cache (issue 5), under the interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("optuna")

from flashmhf.cache.device import device_info  # noqa: E402
from flashmhf.cache.store import CacheFileError, ResultKey, TuningCache  # noqa: E402
from flashmhf.codegen import Spec  # noqa: E402
from flashmhf.tuner.multi import _worker_argv, fail_running_trials_of, gpu_indices  # noqa: E402

SPEC = Spec("fwd", 2, 1, 32, 2, 32, "fp32")
ARGS = ["tune", "--d-model", "64", "--heads", "2", "--kv-heads", "1", "--d-ff", "64", "--experts", "2",
        "--dtype", "fp32", "--kind", "fwd", "--tokens", "16", "--no-isolate"]


def _worker(tmp_path, tag: str, trials: int, seed: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flashmhf.cli", *ARGS, "--trials", str(trials), "--seed", str(seed),
           "--cache", str(tmp_path / "c.sqlite"), "--worker", "--storage", f"journal:{tmp_path / 's.journal'}"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLASHMHF_WORKER_TAG": tag}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _trials(tmp_path):
    with TuningCache(tmp_path / "c.sqlite", readonly=True) as cache:
        return cache.trials(ResultKey.for_spec(SPEC, 16, device_info()))


def _trials_so_far(tmp_path) -> int:
    """Trials the running worker has recorded; 0 while it is still creating the file (empty, no header)."""
    if not (tmp_path / "c.sqlite").exists():
        return 0
    try:
        return len(_trials(tmp_path))
    except CacheFileError:
        return 0


def test_two_workers_share_one_study_without_duplicates_or_losses(tmp_path):
    procs = [_worker(tmp_path, f"w{i}", trials=10, seed=i) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    configs = [t.canonical_config() for t in _trials(tmp_path)]
    assert len(configs) == len(set(configs)), "a config was measured twice"
    assert len(configs) == 10, f"expected the 10 budgeted configs, got {len(configs)}"
    sources = {t.source for t in _trials(tmp_path)}
    assert len(sources) == 1  # one study name: both workers fed the same study


def test_a_killed_worker_leaves_its_trials_failed_and_a_new_worker_finishes(tmp_path):
    victim = _worker(tmp_path, "victim", trials=12, seed=5)
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        time.sleep(0.2)
        if _trials_so_far(tmp_path) >= 3:
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    fail_running_trials_of(f"journal:{tmp_path / 's.journal'}", tmp_path / "c.sqlite", "victim")
    survivor = _worker(tmp_path, "late-joiner", trials=12, seed=6)
    _, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-2000:]
    configs = [t.canonical_config() for t in _trials(tmp_path)]
    assert len(configs) == len(set(configs)) == 12


def test_gpu_list_parsing_and_worker_command_line():
    assert gpu_indices("0,2") == [0, 2]
    with pytest.raises(ValueError, match="--gpus"):
        gpu_indices("0,0")
    with pytest.raises(ValueError, match="--gpus"):
        gpu_indices("a")
    argv = ["tune", "--preset", "repo-1.3b", "--gpus", "all", "--storage", "x", "--trials", "4"]
    assert _worker_argv(argv, "journal:/j") == ["tune", "--preset", "repo-1.3b", "--trials", "4", "--worker",
                                                "--storage", "journal:/j"]
