"""Starting points of a study from results already in the cache files: the same kind's top configs at
neighbouring token buckets and of other shapes, nearest first, moved into this study's space.

A fast config at T = 4096 is usually fast at T = 16384, and one preset's best usually suits a preset
of the same head width; measuring those first is what finds a narrow optimum inside a small budget
(a cold TPE start finds it in some runs only). Results of another template or Triton version are
stale as timings but still good guesses, so they are used too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path

from flashmhf.cache.paths import cache_files_in_effect
from flashmhf.cache.store import CacheFileError, ResultKey, TuningCache, canonical_config
from flashmhf.codegen import Config, KernelKind
from flashmhf.codegen.dtypes import DTYPE_BYTES

# Configs taken from each other key (its best first): a neighbour's runner-up is often this key's best.
TOP_PER_KEY = 3
# A config outside this study's space (e.g. a tile too large for fewer tokens) stands for its
# nearest accepted config only if that is at most this many ordinal steps away.
MAX_PROJECTION_STEPS = 2
# Ordering of other keys, in token-bucket doublings added to the bucket distance. Tile choices follow
# d_h and the element size: the same shape in another dtype of that size (bf16 and fp16 run the same
# MMA at the same rate) is nearer than another shape of the same head width; a head width or element
# size that differs is far.
SAME_SHAPE_OTHER_DTYPE_PENALTY = 0.5
OTHER_SHAPE_PENALTY = 1.0
UNLIKE_SHAPE_PENALTY = 3.0


def seed_cache_paths() -> list[Path]:
    """The readable cache files in effect (``FLASHMHF_CACHE``, the user's, the shipped ones)."""
    return [p for p, _ in cache_files_in_effect() if p.is_file()]


def ordinal(kind: KernelKind, config: Config) -> tuple[int, ...] | None:
    """Index of each param's value in its declared list, or None if a value is not declared."""
    try:
        return tuple(p.values.index(config[p.name]) for p in kind.params)
    except (KeyError, ValueError):
        return None


def neighbours(kind: KernelKind, config: Config) -> list[Config]:
    """Configs one step away (one param moved to the adjacent declared value), in param order."""
    idx = ordinal(kind, config)
    if idx is None:
        return []
    out = []
    for i, p in enumerate(kind.params):
        for j in (idx[i] - 1, idx[i] + 1):
            if 0 <= j < len(p.values):
                out.append({**config, p.name: p.values[j]})
    return out


class Space:
    """A study's configs with their ordinal positions, to move outside configs to the nearest one."""

    def __init__(self, kind: KernelKind, configs: Iterable[Config]) -> None:
        self.kind = kind
        self.configs = list(configs)
        self._by_key = {canonical_config(c): c for c in self.configs}
        self.keys = set(self._by_key)
        self._points = [(ordinal(kind, c), c) for c in self.configs]

    def config(self, key: str) -> Config:
        """The config of a canonical key of this space."""
        return self._by_key[key]

    def project(self, config: Config) -> Config | None:
        """``config`` (completed with params added later) if it is in the space, else the nearest
        config within MAX_PROJECTION_STEPS ordinal steps (first in space order on a tie), else None."""
        config = self.kind.complete(config)
        if canonical_config(config) in self.keys:
            return config
        idx = ordinal(self.kind, config)
        if idx is None:
            return None
        best, best_d = None, MAX_PROJECTION_STEPS + 1
        for point, c in self._points:
            d = sum(abs(a - b) for a, b in zip(point, idx))
            if d < best_d:
                best, best_d = c, d
        return best


def _key_distance(other: ResultKey, key: ResultKey) -> tuple[float, float]:
    """(bucket doublings plus a shape penalty, the shape penalty): smaller is likelier to share a best."""
    same_width = DTYPE_BYTES[other.spec.dtype] == DTYPE_BYTES[key.spec.dtype]
    if other.spec == key.spec:
        shape = 0.0
    elif same_width and other.spec == dataclasses.replace(key.spec, dtype=other.spec.dtype):
        shape = SAME_SHAPE_OTHER_DTYPE_PENALTY
    elif same_width and other.spec.head_dim == key.spec.head_dim:
        shape = OTHER_SHAPE_PENALTY
    else:
        shape = UNLIKE_SHAPE_PENALTY
    return abs(math.log2(other.bucket) - math.log2(key.bucket)) + shape, shape


def ranked_configs(caches: Iterable[TuningCache], key: ResultKey) -> list[list[Config]]:
    """Per other key of the same kind and device (nearest first): its distinct ok configs, fastest
    first, at most TOP_PER_KEY. The key itself is left out, but not its rows under another template,
    Triton version or space (stale timings, likely winners)."""
    best_of: dict[ResultKey, list[tuple[float, Config]]] = {}
    for cache in caches:
        for trial in cache.find_trials(kind=key.spec.kind, device=key.device):
            if trial.key == key or not trial.ok:
                continue
            best_of.setdefault(trial.key, []).append((trial.median_ms, trial.config))
    out = []
    for other in sorted(best_of, key=lambda k: _key_distance(k, key)):
        configs, seen = [], set()
        for _, config in sorted(best_of[other], key=lambda mc: mc[0]):
            c = canonical_config(config)
            if c not in seen:
                seen.add(c)
                configs.append(config)
            if len(configs) == TOP_PER_KEY:
                break
        out.append(configs)
    return out


def transfer_seeds(caches: Iterable[TuningCache], key: ResultKey, space: Space, limit: int) -> list[Config]:
    """Up to ``limit`` configs of ``space`` to measure first: every neighbouring key's best (nearest
    key first), then every key's second best, and so on."""
    per_key = ranked_configs(caches, key)
    out, seen = [], set()
    for rank in range(TOP_PER_KEY):
        for configs in per_key:
            if len(out) >= limit:
                return out
            if rank >= len(configs):
                continue
            config = space.project(configs[rank])
            if config is not None and (c := canonical_config(config)) not in seen:
                seen.add(c)
                out.append(config)
    return out


def open_seed_caches(paths: Iterable[Path], exclude: Path | None = None) -> list[TuningCache]:
    """Read-only handles of ``paths`` (``exclude``, the file being written, is read through its own
    handle); a file that cannot be read is skipped: seeds are a help, not a requirement."""
    out = []
    for path in paths:
        if exclude is not None and Path(path).resolve() == Path(exclude).resolve():
            continue
        try:
            out.append(TuningCache(path, readonly=True))
        except (CacheFileError, OSError):
            continue
    return out
