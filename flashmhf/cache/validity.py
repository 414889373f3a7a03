"""Whether a stored row can be used: one set of checks for every place rows enter or are read.

Rows enter through `flashmhf tune`, `cache import` and `cache merge`, and are read by the runtime's
lookup, `cache verify` and `doctor`. A row that fails here is never launched: the runtime skips it
(with one warning), merge skips it, import and the tuner refuse it, verify reports it.
"""

from __future__ import annotations

import math
from typing import Any

from flashmhf.codegen.kinds import KINDS

STATUSES = ("ok", "out-of-resources", "compile-error", "crash", "wrong-result")
TIME_FIELDS = ("median_ms", "p20_ms", "p80_ms")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def config_problem(kind: str, config: Any) -> str | None:
    """Why ``config`` is not a config of ``kind`` (an object of integers, each one of its param's
    declared values, every param present once older rows are completed), or None if it is one.

    A kind unknown to this flashmhf is checked for shape only (it is never launched here)."""
    if not isinstance(config, dict):
        return f"config must be an object of integers, got {_short(config)}"
    for name, value in config.items():
        if not isinstance(name, str):
            return f"config keys must be strings, got {_short(name)}"
        if not isinstance(value, int) or isinstance(value, bool):
            return f"config {name} must be an integer, got {_short(value)}"
    spec_kind = KINDS.get(kind)
    if spec_kind is None:
        return None
    full = spec_kind.complete(config)
    missing = [n for n in spec_kind.param_names if n not in full]
    unknown = [n for n in full if n not in spec_kind.param_names]
    if missing or unknown:
        return (f"config for kind {kind} must have keys {', '.join(spec_kind.param_names)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(_short(n, 30) for n in unknown)}" if unknown else ""))
    for p in spec_kind.params:
        if full[p.name] not in p.values:
            values = ", ".join(map(str, p.values))
            return f"config {p.name}={_short(full[p.name], 30)} is not one of its values {values}"
    return None


def time_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a time in milliseconds (None is allowed: not measured)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"{name} must be a finite positive number of milliseconds, got {_short(value)}"
    return None


def trial_problem(kind: str, row: dict) -> str | None:
    """Why a trial row (``config`` as an object, ``status``, times) of ``kind`` cannot be stored or used."""
    status = row.get("status")
    if status not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {_short(status)}"
    for name in TIME_FIELDS:
        if problem := time_problem(name, row.get(name)):
            return problem
    if status == "ok" and row.get("median_ms") is None:
        return "median_ms is required for an 'ok' trial"
    return config_problem(kind, row.get("config"))
