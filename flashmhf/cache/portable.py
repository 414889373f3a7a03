"""The portable JSON form of a cache (`flashmhf cache export/import`): write, read and validate."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from flashmhf.cache.store import (
    FORMAT,
    KEY_FIELDS,
    SCHEMA_VERSION,
    TRIAL_FIELDS,
    ResultKey,
    TuningCache,
    canonical_config,
    portable_document,
)
from flashmhf.cache.validity import trial_problem

Rows = list[tuple[ResultKey, dict]]


def export_text(cache: TuningCache, **filters: Any) -> tuple[str, int]:
    """(JSON text, trials in it) of the keys matching ``filters`` with all their trials; deterministic
    but for the export time (sorted keys and fields)."""
    grouped: dict[ResultKey, list[dict]] = {}
    for key, row in cache.matching_rows(**filters):
        row = {k: row[k] for k in TRIAL_FIELDS}
        row["config"] = json.loads(row["config"])
        grouped.setdefault(key, []).append(row)
    bests = {k: t.config for k, t in cache.best_rows(**filters)}
    doc = portable_document(grouped, bests)
    return json.dumps(doc, indent=1, sort_keys=True) + "\n", sum(len(t) for t in grouped.values())


def export_json(cache: TuningCache, dest: str | os.PathLike | IO[str], **filters: Any) -> int:
    """Write the keys matching ``filters`` with all their trials as reviewable JSON to a path or a
    text stream; returns trials written. (`flashmhf cache export` writes files through
    ``flashmhf.cli.files.write_new``, which refuses to overwrite.)"""
    text, n = export_text(cache, **filters)
    if hasattr(dest, "write"):
        dest.write(text)  # type: ignore[union-attr]
    else:
        Path(dest).write_text(text, encoding="utf-8")
    return n


def read_export(src: str | os.PathLike | IO[str]) -> Rows:
    """The validated (key, trial row) pairs of an exported document (a path or a text stream).

    Raises ``ValueError`` naming the file and the place for anything that is not a valid export:
    nothing of a bad document is imported."""
    name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<stream>")
    if hasattr(src, "read"):
        text = src.read()  # type: ignore[union-attr]
    else:
        data = Path(src).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name}: not a JSON export (not UTF-8 text)") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name}: not JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{name}: not a flashmhf export (JSON nested too deeply)") from None
    return list(parse_document(doc, name))


def import_json(cache: TuningCache, src: str | os.PathLike | IO[str]) -> int:
    """Add the trials of an exported document; returns trials added. Trials already present are
    skipped; bests are recomputed from the trials (the document's ``best`` fields are informative)."""
    return cache.add_trials(read_export(src))


def parse_document(doc: Any, name: str) -> Iterator[tuple[ResultKey, dict]]:
    """Validate an exported JSON document and yield (key, trial row) pairs."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{name}: not a flashmhf tuning-cache export (expected \"format\": \"{FORMAT}\")")
    version = doc.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{name}: schema_version must be an integer <= {SCHEMA_VERSION}, got {version!r}")
    results = doc.get("results")
    if not isinstance(results, list):
        raise ValueError(f"{name}: \"results\" must be a list")
    for i, result in enumerate(results):
        where = f"{name}: results[{i}]"
        if not isinstance(result, dict) or not isinstance(result.get("key"), dict):
            raise ValueError(f"{where}: must be an object with a \"key\" object")
        kd = result["key"]
        if set(kd) != set(KEY_FIELDS):
            raise ValueError(f"{where}.key: must have exactly the fields {', '.join(KEY_FIELDS)}")
        key = ResultKey.from_dict(kd)
        try:
            key.validate()
        except ValueError as exc:
            raise ValueError(f"{where}.key: {exc}") from None
        trials = result.get("trials")
        if not isinstance(trials, list):
            raise ValueError(f"{where}.trials: must be a list")
        for j, t in enumerate(trials):
            yield key, parse_trial(t, key.spec.kind, f"{where}.trials[{j}]")


def parse_trial(t: Any, kind: str, where: str) -> dict:
    """One exported trial of ``kind`` as a row to store; ``ValueError`` naming the field otherwise."""
    if not isinstance(t, dict):
        raise ValueError(f"{where}: must be an object")
    problem = trial_problem(kind, t)
    if problem:
        field = next((f for f in ("status", "median_ms", "p20_ms", "p80_ms", "config") if problem.startswith(f)),
                     "config")
        raise ValueError(f"{where}.{field}: {problem}")
    row = {"config": canonical_config(t["config"]), "status": t["status"]}
    for name in ("median_ms", "p20_ms", "p80_ms"):
        row[name] = None if t.get(name) is None else float(t[name])
    for name, default in (("torch_version", ""), ("error", None), ("source", None), ("host", "")):
        v = t.get(name, default)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}.{name}: must be a string, got {v!r}")
        row[name] = v if v is not None else default
    if not isinstance(t.get("recorded_at"), str) or not t["recorded_at"]:
        raise ValueError(f"{where}.recorded_at: must be a timestamp string")
    row["recorded_at"] = t["recorded_at"]
    return row
