"""`flashmhf tune --gpus …`: one worker process per GPU on one set of shared Optuna studies.

Each worker is the same `flashmhf tune` command with `--worker`, pinned to its GPU through
CUDA_VISIBLE_DEVICES, joined to one storage (default: the journal file next to the cache) and
writing to one cache file (safe with concurrent writers). Workers claim a config before measuring
it, so no config is measured twice. A worker that dies is reported, its running trials are marked
failed (so they are not waited for), and the others go on; a new worker can join at any time with
`flashmhf tune … --worker --storage URL`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from flashmhf.tuner.session import default_journal, open_storage


def gpu_indices(spec: str) -> list[int]:
    """'all' -> every visible GPU; '0,2' -> [0, 2]."""
    if spec.strip() == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--gpus all: no CUDA GPU is visible")
        return list(range(n))
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpus must be 'all' or a comma list of GPU indices, got {spec!r}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"--gpus must list distinct non-negative GPU indices, got {spec!r}")
    return ids


def _worker_argv(argv: list[str], storage: str) -> list[str]:
    """This command line with --gpus removed and --worker --storage added."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus=") or a == "--worker":
            continue
        if a == "--storage" or a.startswith("--storage="):
            skip = a == "--storage"
            continue
        out.append(a)
    return [*out, "--worker", "--storage", storage]


def fail_running_trials_of(storage_url: str, cache_path: Path, worker_tag: str) -> int:
    """Mark the RUNNING trials a dead worker left behind as FAIL and release its claims, so that the
    configs it was measuring are free again; returns how many trials were failed."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(storage_url, cache_path)
    n = 0
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study_id = storage.get_study_id_from_name(summary.study_name)
        for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker_tag") == worker_tag:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                n += 1
        # Completed configs stay taken through their COMPLETE trials; only the claims are released.
        for attr, owner in storage.get_study_user_attrs(study_id).items():
            if attr.startswith("claim:") and str(owner).startswith(worker_tag + "|"):
                storage.set_study_user_attr(study_id, attr, "released")
    return n


def run_on_gpus(gpus: str, *, cache_path: Path, storage: str | None, console: Console,
                argv: list[str] | None = None) -> int:
    """Start one worker per GPU and wait for all; returns how many workers failed."""
    ids = gpu_indices(gpus)
    storage_url = storage or f"journal:{default_journal(cache_path)}"
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cache" not in argv and not any(a.startswith("--cache=") for a in argv):
        argv += ["--cache", str(cache_path)]
    cmd = [sys.executable, "-m", "flashmhf.cli", *_worker_argv(argv, storage_url)]
    log_dir = cache_path.parent / "tune-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for gpu in ids:
        tag = f"gpu{gpu}-{os.getpid()}-{time.time_ns()}"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "FLASHMHF_WORKER_TAG": tag}
        log = open(log_dir / f"worker-gpu{gpu}.log", "w")  # noqa: SIM115 - closed when the worker ends
        procs[gpu] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), tag, log)
        console.print(f"worker on GPU {gpu} started (pid {procs[gpu][0].pid}, log {log.name})")
    console.print(f"shared storage: {storage_url}; cache: {cache_path}")
    failed = 0
    t0 = time.monotonic()
    while procs:
        time.sleep(1.0)
        for gpu, (proc, tag, log) in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            log.close()
            del procs[gpu]
            if code == 0:
                console.print(f"worker on GPU {gpu} finished ({time.monotonic() - t0:.0f} s)")
            else:
                failed += 1
                n = fail_running_trials_of(storage_url, cache_path, tag)
                console.print(f"[red]worker on GPU {gpu} exited with code {code}[/] after "
                              f"{time.monotonic() - t0:.0f} s; {n} running trial(s) marked failed; the other "
                              f"workers go on. See {log.name}")
    console.print(f"all workers done in {time.monotonic() - t0:.0f} s; "
                  f"results: flashmhf cache show --cache {cache_path}")
    return failed
