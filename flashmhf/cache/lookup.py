"""Runtime lookup of tuned configs in the cache files in effect (docs/design.md §4).

Order: the files of ``FLASHMHF_CACHE`` → the user's cache file → the shipped files. Of the usable
results for (kind, spec, device name, capability) in all of them, the exact token bucket's answers,
else the nearest tuned bucket in log2 space (ties: the larger bucket); where several files have
that bucket, the first in order answers. So a user's file tuned at one token count overrides the
shipped result there, not at the shipped file's other buckets (measured for those). Usable means:
measured with the installed template hash, not demoted in this process, and accepted by the kind's
``check_config`` on the device's architecture (for a nearest bucket, at the requested bucket's
token count, so a tile too large for it is not borrowed). Results measured under the running Triton
version come first; only where no file has one, a result from another Triton version (e.g. the
shipped results under a newer pip-installed Triton) is used, with a one-time warning that names
the `flashmhf tune` command; if it then fails to compile, the runtime demotes it. Results for
another template are not used (a one-time warning says so). A file that cannot be read (corrupt,
newer schema, not ours) is reported once and skipped. Each file's best rows are read once per
process; :func:`invalidate` forgets them.

The runtime never writes to cache files: :func:`demote` is in-process only (a config that failed
here may work after a driver update; re-tuning records real failures).
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from flashmhf.cache.buckets import tune_command
from flashmhf.cache.device import DeviceInfo
from flashmhf.cache.notice import CacheWarning, plain
from flashmhf.cache.paths import ROLE_OVERLAY, cache_files_in_effect
from flashmhf.codegen import Config, Spec
from flashmhf.codegen.arch import Arch, arch_for_capability

log = logging.getLogger("flashmhf.cache")


@dataclass(frozen=True)
class _Row:
    bucket: int
    triton_version: str
    template_hash: str
    config: dict
    median_ms: float


# (spec, device name, capability) -> best rows of that spec on that device
_View = dict[tuple, list[_Row]]

_views: dict[Path, _View | None] = {}
_memo: dict[tuple, tuple[Config, str] | None] = {}
_times: dict[tuple, dict[int, float]] = {}
_demoted: set[tuple] = set()
_warned: set[tuple] = set()
_lock = threading.RLock()


def _warn_once(tag: tuple, message: str) -> None:
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(plain(message), CacheWarning, stacklevel=5)


def _spec_device_key(spec: Spec, device: DeviceInfo) -> tuple[Spec, str, str]:
    return spec, device.name, device.capability


def _trial_problem(key, trial) -> str | None:
    from flashmhf.cache.validity import trial_problem

    try:
        key.validate()
    except ValueError as exc:
        return str(exc)
    return trial_problem(key.spec.kind, {"config": trial.config, "status": trial.status, "median_ms": trial.median_ms,
                                    "p20_ms": trial.p20_ms, "p80_ms": trial.p80_ms})


def _next_best(cache, key):
    """The fastest valid, eligible ok trial of ``key`` (when its recorded best is unusable), or None."""
    from flashmhf.cache.store import DISQUALIFYING

    trials = cache.trials(key)
    disqualified = {repr(t.config) for t in trials if t.status in DISQUALIFYING}
    ok = [t for t in trials if t.ok and repr(t.config) not in disqualified and _trial_problem(key, t) is None]
    return min(ok, key=lambda t: (t.median_ms, t.canonical_config()), default=None)


def _read_file(path: Path, role: str) -> _View:
    """The usable best row of every key in one file. A row that could never be launched (bad key,
    config outside its kind's values, bad time) gives way to the key's next-best valid trial; one
    warning per file says how many were skipped."""
    from flashmhf.cache.store import CacheFileError, TuningCache

    view: _View = {}
    problems: list[str] = []
    with TuningCache(path, readonly=True) as cache:
        if damage := cache.quick_check():
            raise CacheFileError(f"{path}: damaged file ({damage})")
        for key, trial in cache.best_rows():
            if problem := _trial_problem(key, trial):
                problems.append(f"{key.spec.kind} bucket {key.bucket!r}: {problem}")
                trial = None if problem.startswith("ResultKey") else _next_best(cache, key)
                if trial is None:
                    continue
            view.setdefault((key.spec, key.device, key.capability), []).append(
                _Row(key.bucket, key.triton_version, key.template_hash, trial.config, trial.median_ms)
            )
    if problems:
        _warn_once(("rows", path), f"flashmhf: tuning cache ({role}) {path}: {len(problems)} unusable tuned row(s) "
                                   f"skipped (e.g. {problems[0]}); run `flashmhf cache verify --cache {path}`")
    return view


def _view(path: Path, role: str) -> _View | None:
    """The best rows of one file, read once; None (reported once) when it cannot be used."""
    with _lock:
        if path in _views:
            return _views[path]
    view: _View | None
    if path.is_dir():
        view = None
        _warn_once(("dir", path), f"flashmhf: {role} cache {path} is a directory, not a cache file; skipped")
    elif not path.is_file():
        view = None
        if role == ROLE_OVERLAY:
            _warn_once(("missing", path), f"flashmhf: FLASHMHF_CACHE names {path}, which does not exist; skipped")
    else:
        try:
            view = _read_file(path, role)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped; the model runs on defaults
            view = None
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if str(path) not in reason:
                reason = f"{path}: {reason}"
            _warn_once(("bad", path), f"flashmhf: skipping tuning cache ({role}) {reason}; run `flashmhf cache "
                                      f"verify --cache {path}`")
    with _lock:
        _views[path] = view
    return view


def _config_id(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def _stale_warning(spec: Spec, bucket: int, device: DeviceInfo, stale: list[tuple[str, Path, _Row]]) -> None:
    from flashmhf.codegen import template_hash

    role, path, row = stale[0]
    _warn_once(
        ("stale", _spec_device_key(spec, device)),
        f"flashmhf: tuned {spec.kind} configs for {spec.label()} on {device.name} in {role}:{path} were measured "
        f"with template {row.template_hash} (installed template {template_hash(spec.kind)}); they are not used. "
        f"Re-tune with: {tune_command(spec, bucket)}",
    )


def _other_triton_note(spec: Spec, bucket: int, device: DeviceInfo, row_version: str, where: str) -> None:
    from flashmhf_runtime.dispatch import tune_command

    _warn_once(
        ("other-triton", _spec_device_key(spec, device)),
        f"flashmhf: using {spec.kind} configs for {spec.label()} tuned under Triton {row_version} ({where}); "
        f"this is Triton {device.triton_version}. To tune for it: {tune_command(spec, bucket)}",
    )


def _pick(spec: Spec, bucket: int, candidates: list[tuple[str, _Row]], arch: Arch) -> tuple[str, _Row] | None:
    """Of (where, row) pairs in file order: the exact bucket's row, else the nearest (log2 distance,
    ties to the larger) that the kind accepts; at equal buckets the earlier file's row."""
    from flashmhf.codegen import SpecError, get_kind

    kind = get_kind(spec.kind)
    # A stable sort: between rows of one bucket the earlier (file, then time) keeps its place.
    for where, row in sorted(candidates, key=lambda c: (abs(math.log2(c[1].bucket) - math.log2(bucket)),
                                                          -c[1].bucket)):
        try:
            kind.check_config(spec, row.config, None if row.bucket == bucket else bucket, arch)
        except SpecError as exc:
            if row.bucket == bucket:  # tuned for exactly this: a config the kind rejects is news
                _warn_once(("rejected", where, spec, _config_id(row.config)),
                           f"flashmhf: cached config in {where} rejected for {spec.label()} bucket {bucket}: {exc}")
            else:  # a neighbour's tile may simply not fit this token count
                log.info("flashmhf: cached config in %s skipped for %s bucket %d: %s", where, spec.label(), bucket,
                         exc)
            continue
        return where, row
    return None


def _rows_by_file(spec: Spec, device: DeviceInfo) -> tuple[list, list, list]:
    """The rows of ``spec`` on ``device`` not demoted, per file in effect (in order), as three lists:
    (where, rows) on the installed template measured under the running Triton, the same under other
    Triton versions, and (role, path, row) measured with another template (stale)."""
    from flashmhf.codegen import template_hash

    current = template_hash(spec.kind)
    spec_key = _spec_device_key(spec, device)
    stale: list[tuple[str, Path, _Row]] = []
    same: list[tuple[str, list[_Row]]] = []
    other: list[tuple[str, list[_Row]]] = []
    for path, role in cache_files_in_effect():
        view = _view(path, role)
        rows = [r for r in (view.get(spec_key, []) if view else []) if (spec_key, _config_id(r.config)) not in _demoted]
        stale += [(role, path, r) for r in rows if r.template_hash != current]
        rows = [r for r in rows if r.template_hash == current]
        same.append((f"{role}:{path}", [r for r in rows if r.triton_version == device.triton_version]))
        other.append((f"{role}:{path}", [r for r in rows if r.triton_version != device.triton_version]))
    return same, other, stale


def _find(spec: Spec, bucket: int, device: DeviceInfo, arch: Arch) -> tuple[Config, str] | None:
    same, other, stale = _rows_by_file(spec, device)
    found, source = None, ""
    for tier in (same, other):  # the running Triton version's results first, from any file
        candidates = [(where, r) for where, rows in tier for r in sorted(rows, key=lambda r: r.median_ms)]
        picked = _pick(spec, bucket, candidates, arch)
        if picked is not None:
            where, found = picked
            source = f"{where} bucket {found.bucket}"
            break
    if found is not None and found.triton_version != device.triton_version:
        _other_triton_note(spec, bucket, device, found.triton_version, source)
        source += f" (Triton {found.triton_version})"
    if stale and (found is None or found.bucket != bucket):
        _stale_warning(spec, bucket, device, stale)
    return None if found is None else (dict(found.config), source)


def find_config(spec: Spec, bucket: int, device: DeviceInfo, arch: Arch | None = None) -> tuple[Config, str] | None:
    """Best cached config for (spec, token bucket, device) and where it came from, e.g.
    ``("…", "user:/home/me/.cache/flashmhf/tuned.sqlite bucket 64")``; None when nothing usable is cached.
    ``arch`` (default: the table's row for the device's capability) is what configs are checked against.

    Never raises for a bad cache file (it is reported once and skipped).
    """
    arch = arch or arch_for_capability(device.cuda_capability)
    memo_key = (spec, bucket, device, arch)
    with _lock:
        if memo_key in _memo:
            hit = _memo[memo_key]
            return None if hit is None else (dict(hit[0]), hit[1])
    result = _find(spec, bucket, device, arch)
    with _lock:
        _memo[memo_key] = result
    return None if result is None else (dict(result[0]), result[1])


def tuned_times(spec: Spec, device: DeviceInfo) -> dict[int, float]:
    """Median time (ms) of ``spec``'s best tuned config on ``device`` at each tuned token bucket:
    what the runtime compares to choose among the kinds of one role. Rows as :func:`find_config`
    takes them (installed template, not demoted; per bucket, the first file in effect that has one,
    the running Triton version before others; within a file, its fastest row). {} when nothing is
    tuned."""
    spec_key = _spec_device_key(spec, device)
    with _lock:
        if spec_key in _times:
            return dict(_times[spec_key])
    same, other, _stale = _rows_by_file(spec, device)
    times: dict[int, float] = {}
    for _where, rows in same + other:  # the running Triton version first; files in effect in order
        in_file: dict[int, float] = {}
        for r in rows:  # a file may hold a bucket under several keys (e.g. earlier config spaces): its fastest
            in_file[r.bucket] = min(r.median_ms, in_file.get(r.bucket, math.inf))
        for bucket, ms in in_file.items():
            times.setdefault(bucket, ms)
    with _lock:
        _times[spec_key] = times
    return dict(times)


def demote(spec: Spec, bucket: int, device: DeviceInfo, config: Config, reason: str) -> None:
    """Stop using ``config`` for ``spec`` on this device in this process, at every bucket.

    A config that fails to compile or launch fails whatever the token count, so it is dropped for
    the whole spec; the lookup then falls back to the next usable result. Nothing is written.
    """
    log.warning("flashmhf: demoting cached config %s for %s (bucket %d) on %s: %s",
                config, spec.label(), bucket, device.name, reason)
    with _lock:
        _demoted.add((_spec_device_key(spec, device), _config_id(config)))
        for key in [k for k in _memo if k[0] == spec and k[2] == device]:
            del _memo[key]
        _times.pop(_spec_device_key(spec, device), None)


def invalidate() -> None:
    """Forget everything read, chosen, demoted and warned. Callers outside the cache use
    ``flashmhf_runtime.reset()``, which also forgets the runtime's own memoised choices."""
    with _lock:
        _views.clear()
        _memo.clear()
        _times.clear()
        _demoted.clear()
        _warned.clear()
