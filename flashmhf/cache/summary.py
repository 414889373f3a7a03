"""What the cache files in effect hold: per-file state and counts, and what is tuned for a device.

Used by `flashmhf cache ls` and `flashmhf doctor`; never creates or writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashmhf.cache.device import DeviceInfo
from flashmhf.cache.paths import cache_files_in_effect
from flashmhf.cache.store import ResultKey, Trial, TuningCache, stored_trial_problem


@dataclass(frozen=True)
class FileReport:
    path: Path
    role: str
    exists: bool
    problem: str | None  # why the file cannot be used, None when it is fine (or missing)
    counts: dict[str, int] | None  # keys / trials / best, when readable
    unusable: int = 0  # rows the runtime skips (see flashmhf.cache.validity)

    @property
    def state(self) -> str:
        if not self.exists:
            return "not created yet" if self.role == "user" else "missing"
        if self.problem is not None:
            return self.problem
        if self.unusable:
            return f"schema ok; {self.unusable} unusable row(s): see `flashmhf cache verify`"
        return "schema ok"


def file_report(path: Path, role: str, **filters: Any) -> FileReport:
    """State and counts of one file, without creating it."""
    if path.is_dir():
        return FileReport(path, role, True, "a directory, not a cache file", None)
    if not path.is_file():
        return FileReport(path, role, False, None, None)
    try:
        with TuningCache(path, readonly=True) as cache:
            if damage := cache.quick_check():
                return FileReport(path, role, True, f"damaged ({damage})", None)
            unusable = sum(stored_trial_problem(k, row) is not None for k, row in cache.matching_rows(**filters))
            return FileReport(path, role, True, None, cache.counts(**filters), unusable)
    except (ValueError, OSError) as exc:  # CacheFileError is a ValueError
        msg = str(exc).splitlines()[0]
        prefix = f"{path}: "
        return FileReport(path, role, True, msg[len(prefix):] if msg.startswith(prefix) else msg, None)
    except Exception as exc:  # noqa: BLE001 - e.g. sqlite3.DatabaseError on a damaged page
        return FileReport(path, role, True, f"unreadable ({exc})", None)


def files_report(**filters: Any) -> list[FileReport]:
    """:func:`file_report` of every file in effect, in lookup order."""
    return [file_report(path, role, **filters) for path, role in cache_files_in_effect()]


@dataclass(frozen=True)
class TunedEntry:
    """One best row for a device, and whether this installation can use it."""

    key: ResultKey
    best: Trial
    role: str
    path: Path
    stale: str | None  # None if usable; else why not (other Triton version, other template, unknown kind)


def staleness(key: ResultKey, triton_version: str) -> str | None:
    """Why a result cannot be used by this installation under ``triton_version``, or None if it can."""
    from flashmhf.codegen import KINDS, template_hash

    kind = key.spec.kind
    if kind not in KINDS:
        return f"unknown kind {kind}"
    if key.template_hash != template_hash(kind):
        return f"template {key.template_hash} (installed {template_hash(kind)})"
    if key.triton_version != triton_version:
        return f"Triton {key.triton_version} (running {triton_version})"
    return None


def tuned_entries(device: DeviceInfo) -> list[TunedEntry]:
    """Every best row for ``device`` (name and capability) in the readable files in effect, in lookup order."""
    out = []
    for path, role in cache_files_in_effect():
        if not path.is_file():
            continue
        try:
            with TuningCache(path, readonly=True) as cache:
                rows = cache.best_rows(device=device.name, capability=device.capability)
        except Exception:  # noqa: BLE001 - unreadable files are reported by files_report
            continue
        out += [TunedEntry(k, t, role, path, staleness(k, device.triton_version)) for k, t in rows]
    return out
