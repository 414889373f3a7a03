"""The portable JSON form of a cache (`flashmhf cache export/import`): validation of a document."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from flashmhf.cache.store import FORMAT, KEY_FIELDS, SCHEMA_VERSION, STATUSES, ResultKey, canonical_config


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
        key = ResultKey(**kd)
        try:
            key.validate()
        except ValueError as exc:
            raise ValueError(f"{where}.key: {exc}") from None
        trials = result.get("trials")
        if not isinstance(trials, list):
            raise ValueError(f"{where}.trials: must be a list")
        for j, t in enumerate(trials):
            yield key, parse_trial(t, f"{where}.trials[{j}]")


def parse_trial(t: Any, where: str) -> dict:
    if not isinstance(t, dict):
        raise ValueError(f"{where}: must be an object")
    status = t.get("status")
    if status not in STATUSES:
        raise ValueError(f"{where}.status: must be one of {', '.join(STATUSES)}, got {status!r}")
    if not isinstance(t.get("config"), dict):
        raise ValueError(f"{where}.config: must be an object, got {t.get('config')!r}")
    row = {"config": canonical_config(t["config"]), "status": status}
    for name in ("median_ms", "p20_ms", "p80_ms"):
        v = t.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{where}.{name}: must be a number or null, got {v!r}")
        row[name] = None if v is None else float(v)
    if status == "ok" and row["median_ms"] is None:
        raise ValueError(f"{where}.median_ms: required for an 'ok' trial")
    for name, default in (("torch_version", ""), ("error", None), ("source", None), ("host", "")):
        v = t.get(name, default)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}.{name}: must be a string, got {v!r}")
        row[name] = v if v is not None else default
    if not isinstance(t.get("recorded_at"), str) or not t["recorded_at"]:
        raise ValueError(f"{where}.recorded_at: must be a timestamp string")
    row["recorded_at"] = t["recorded_at"]
    return row

