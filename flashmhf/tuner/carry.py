"""Carry tuned results to a new template hash when the GPU would run the same kernels.

Editing a template stales every tuned result of its kind (the result key holds the template hash),
also when the edit touches only host code, e.g. how a launch function builds its arguments. Then the
measured kernels are still the ones the new render launches, and re-tuning would only spend GPU time
to find the same configs. ``same_kernels`` decides that for one config without a GPU: both sources'
launches are recorded on CPU tensors (``resources.capture_launches``) and must launch the same kernels
in the same order, each with Triton's same cache key (its source, the globals and functions it uses,
its first line) and the same specialisation (argument types, constexprs, launch options): what
Triton compiles a binary from. ``carry`` re-keys the stale results whose every config passes, and
stores the new source beside them. Kernels only compile for real (not under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from types import ModuleType

from flashmhf.cache.store import ResultKey, TuningCache, canonical_config
from flashmhf.codegen import Spec, template_hash
from flashmhf.codegen.loader import load_source
from flashmhf.tuner.resources import capture_launches, specialisation


@dataclass(frozen=True)
class CarryReport:
    """What ``carry`` did with one stale key."""

    key: ResultKey
    carried: bool
    trials: int
    reason: str = ""

    def line(self) -> str:
        what = f"carried {self.trials} trials" if self.carried else f"left stale ({self.reason})"
        return f"{self.key.label()} template {self.key.template_hash}: {what}"


def _fingerprints(spec: Spec, config: dict, tokens: int, module: ModuleType | None) -> list[tuple]:
    """(kernel name, Triton cache key, specialisation) of each launch, in order; or the error raised."""
    try:
        launches = capture_launches(spec, config, tokens, module)
    except Exception as exc:  # noqa: BLE001 - a config both sources refuse the same way is no difference
        return [("error", type(exc).__name__, str(exc))]
    return [(launch.kernel.__name__, launch.kernel.cache_key, repr(specialisation(launch))) for launch in launches]


def same_kernels(old_source: str, spec: Spec, config: dict, tokens: int) -> bool:
    """Whether the current render of ``spec`` launches with ``config`` at ``tokens`` exactly the kernels
    ``old_source`` (an earlier render) launched."""
    old = load_source(old_source, f"{spec.kind}_carried")
    return _fingerprints(spec, config, tokens, old) == _fingerprints(spec, config, tokens, None)


def _stale_keys(cache: TuningCache, kinds: Iterable[str]) -> dict[ResultKey, list[dict]]:
    stale: dict[ResultKey, list[dict]] = defaultdict(list)
    for kind in kinds:
        current = template_hash(kind)
        for key, row in cache.matching_rows(kind=kind):
            if key.template_hash != current:
                stale[key].append(row)
    return stale


def carry(cache: TuningCache, kinds: Iterable[str]) -> list[CarryReport]:
    """Re-key the results of ``kinds`` tuned on another template to the installed one where
    ``same_kernels`` holds for every config they hold (at the key's bucket); report every stale key."""
    reports = []
    for key, rows in _stale_keys(cache, kinds).items():
        old_source = cache.kernel_source(key.spec, key.template_hash)
        if old_source is None:
            reports.append(CarryReport(key, False, len(rows), "its source is not stored"))
            continue
        configs = {row["config"] for row in rows}
        differ = [c for c in sorted(configs) if not same_kernels(old_source, key.spec, json.loads(c), key.bucket)]
        if differ:
            reports.append(CarryReport(key, False, len(rows), f"other kernels for {len(differ)} of {len(configs)} "
                                                              f"configs, e.g. {differ[0]}"))
            continue
        new_key = replace(key, template_hash=template_hash(key.spec.kind))
        cache.add_trials((new_key, {**row, "config": canonical_config(json.loads(row["config"]))}) for row in rows)
        cache.delete_keys([key])
        if cache.kernel_source(key.spec) is None:
            cache.record_source(key.spec)
        reports.append(CarryReport(key, True, len(rows)))
    return reports
