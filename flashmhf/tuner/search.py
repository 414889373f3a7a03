"""One Optuna study per (kind, spec, token bucket, device): seeded, budgeted, resumable.

Configs are encoded as ordinal integers (the index into each declared value list; for tile sizes
that is log2), so TPE can model "bigger/smaller" instead of unrelated categories. Points the
resource model rejects and points that fail to compile are told as PRUNED (TPE ranks them below
every completed trial); wrong results too, and they are never selected. Every measurement goes to
the cache first, and every measurement already in the cache is given to the study instead of
being measured again.
"""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from flashmhf.cache.device import DeviceInfo
from flashmhf.cache.store import ResultKey, Trial, TuningCache, canonical_config
from flashmhf.codegen import Config, KernelKind, Spec, get_kind
from flashmhf.codegen.arch import Arch, arch_for_capability
from flashmhf.tuner.measure import Measurement
from flashmhf.tuner.precompile import CompilePool
from flashmhf.tuner.worker import MeasureWorker

# After this many proposals in a row that need no measurement (rejected or already measured), the
# search takes an unmeasured config at random: TPE on a small discrete space repeats itself.
MAX_IDLE_PROPOSALS = 40
# Several workers on one study: a worker claims a config, waits this long, and measures it only if
# its claim is the one that stuck (last writer wins in every Optuna storage).
CLAIM_SETTLE_S = 0.3
# Claim values that leave a config free: never claimed, or released after its worker died.
FREE_CLAIMS: tuple = (None, "released")


def distributions(kind: KernelKind) -> dict[str, IntDistribution]:
    return {p.name: IntDistribution(0, len(p.values) - 1) for p in kind.params}


def to_params(kind: KernelKind, config: Config) -> dict[str, int] | None:
    """Ordinal encoding of ``config``, or None if a value is not in the declared space."""
    try:
        return {p.name: p.values.index(config[p.name]) for p in kind.params}
    except (ValueError, KeyError):
        return None


def from_params(kind: KernelKind, params: dict[str, int]) -> Config:
    return {p.name: p.values[params[p.name]] for p in kind.params}


def study_name(key: ResultKey) -> str:
    return (
        f"flashmhf:{key.kind}:H{key.n_heads}-{key.n_kv_heads}:dh{key.head_dim}:E{key.n_experts}x{key.expert_dim}:"
        f"{key.dtype}:T{key.bucket}:{key.device}:sm{key.capability}:triton{key.triton_version}:"
        f"{key.template_hash}:{key.space_hash}"
    )


@dataclass
class SearchResult:
    key: ResultKey
    space_size: int
    brute_force: bool
    measured_total: int  # distinct configs of the space measured, this run and earlier ones
    measured_now: int
    best: Trial | None
    default_config: Config
    default_ms: float | None
    trials_to_within_3pct: int | None  # measurements (in order) until one within 3% of the best
    wall_s: float
    history: list[tuple[Config, Measurement]] = field(default_factory=list)

    @property
    def speedup_over_default(self) -> float | None:
        if self.best is None or not self.default_ms:
            return None
        return self.default_ms / self.best.median_ms


class Search:
    """Tune one key. ``measure`` is the worker; results go to ``cache`` and ``storage``."""

    def __init__(
        self,
        spec: Spec,
        bucket: int,
        device: DeviceInfo,
        cache: TuningCache,
        storage: optuna.storages.BaseStorage,
        worker: MeasureWorker,
        *,
        trials: int,
        deadline: float,
        seed: int | None = None,
        shared: bool = False,
        brute_force_up_to: int | None = None,
        extra_seeds: list[Config] | None = None,
        on_measure: Callable[[SearchResult | None, int, int, float | None], None] | None = None,
        use_cache_measurements: bool = True,
        compile_pool: CompilePool | None = None,
        batch: int | None = None,
        arch: Arch | None = None,
    ) -> None:
        self.spec, self.bucket, self.device = spec, bucket, device
        # What the space is pruned for and the default chosen for: the device's (its table row by default).
        self.arch = arch or arch_for_capability(device.cuda_capability)
        self.kind = get_kind(spec.kind)
        self.key = ResultKey.for_spec(spec, bucket, device)
        self.cache, self.storage, self.worker = cache, storage, worker
        self.trials, self.deadline = trials, deadline
        self.rng = random.Random(seed)
        self.input_seed = self.rng.randrange(2**31) if seed is not None else uuid.uuid4().int % 2**31
        self.shared = shared
        self.brute_force_up_to = trials if brute_force_up_to is None else brute_force_up_to
        self.extra_seeds = extra_seeds or []
        self.on_measure = on_measure
        self.use_cache_measurements = use_cache_measurements
        self.compile_pool = compile_pool
        # Proposals per round: as many as can be compiled in parallel (TPE's constant liar keeps them apart).
        self.batch = batch if batch is not None else (8 if compile_pool is not None else 1)
        self.worker_id = uuid.uuid4().hex[:12]
        # Set by `tune --gpus` for each worker, so the parent can fail the trials of a worker that dies.
        self.worker_tag = os.environ.get("FLASHMHF_WORKER_TAG", "")
        self.claim_id = f"{self.worker_tag}|{self.worker_id}"
        self.space = list(self.kind.space(spec, bucket, self.arch))
        self.space_keys = {canonical_config(c) for c in self.space}
        self.measured: dict[str, Trial | Measurement] = {}
        self.elsewhere: dict[str, float | None] = {}  # shared study: configs other workers took (ms or None)
        self.pending: set[str] = set()  # picked for the current batch, not measured yet
        self.order: list[tuple[str, float | None]] = []  # measurement order: (config, ms or None)
        self.history: list[tuple[Config, Measurement]] = []

    # -- study ----------------------------------------------------------------------------------
    def _open_study(self) -> optuna.Study:
        sampler = optuna.samplers.TPESampler(
            multivariate=True,
            n_startup_trials=max(3, min(10, self.trials // 4)),
            seed=self.rng.randrange(2**31),
            constant_liar=True,  # several workers: running trials count as bad until they finish
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(
            study_name=study_name(self.key), storage=self.storage, sampler=sampler, direction="minimize",
            load_if_exists=True,
        )

    def _sync_from_cache(self, study: optuna.Study) -> None:
        """Give the study every measurement already in the cache (any space hash) that it lacks."""
        if self.use_cache_measurements:
            for c, trial in self.cache.measured_configs(self.key).items():
                if c in self.space_keys:
                    if trial.key != self.key:
                        self._adopt(trial)
                    self.measured[c] = trial
        in_study = set()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if set(t.params) == set(self.kind.param_names):
                in_study.add(canonical_config(from_params(self.kind, t.params)))
        for c, trial in self.measured.items():
            if c not in in_study:
                self._add_known(study, trial.config, trial.median_ms if trial.status == "ok" else None)
        self.order = [(c, t.median_ms if t.status == "ok" else None) for c, t in self.measured.items()]

    def _adopt(self, trial: Trial) -> None:
        """Record a measurement made under another space hash (same template, device, Triton) for
        this key too: otherwise a run whose goal is met by reused measurements leaves the key
        without a best row, and the runtime, which reads only this key, without a tuned config."""
        self.cache.record_trial(
            self.key, trial.config, trial.status, median_ms=trial.median_ms, p20_ms=trial.p20_ms,
            p80_ms=trial.p80_ms, torch_version=trial.torch_version, error=trial.error,
            source=f"reused:{trial.source or ''}",
        )

    def _add_known(self, study: optuna.Study, config: Config, ms: float | None) -> None:
        params = to_params(self.kind, config)
        if params is None:
            return
        state = TrialState.COMPLETE if ms is not None else TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(
            state=state, value=ms, params=params, distributions=distributions(self.kind),
        ))

    # -- claims for several workers ---------------------------------------------------------
    def _claim(self, study: optuna.Study, c: str) -> bool:
        if not self.shared:
            return True
        attr = f"claim:{c}"
        if study.user_attrs.get(attr) not in FREE_CLAIMS + (self.claim_id,):
            return False
        study.set_user_attr(attr, self.claim_id)
        time.sleep(CLAIM_SETTLE_S)
        return self.storage.get_study_user_attrs(study._study_id).get(attr) == self.claim_id

    # -- measuring --------------------------------------------------------------------------
    def _measure(self, config: Config) -> Measurement:
        m = self.worker.measure(self.spec, self.bucket, self.input_seed, config)
        self.cache.record_trial(
            self.key, config, m.status, median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms,
            torch_version=self.device.torch_version, error=m.error, source=f"optuna:{study_name(self.key)}",
        )
        c = canonical_config(config)
        self.measured[c] = m
        self.order.append((c, m.median_ms if m.status == "ok" else None))
        self.history.append((config, m))
        if self.on_measure:
            self.on_measure(None, self._measured_in_space(), self._goal(), self._best_ms())
        return m

    def _measured_in_space(self) -> int:
        return len(self._taken() & self.space_keys)

    def _taken(self) -> set[str]:
        return set(self.measured) | set(self.elsewhere) | self.pending

    def _refresh_shared(self, study: optuna.Study) -> None:
        """Shared study: note configs other workers have measured or are measuring."""
        if not self.shared:
            return
        # Rebuilt each time: a trial of a worker that died is marked FAIL and becomes free again.
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        claims = study.user_attrs
        elsewhere: dict[str, float | None] = {}
        for t in study.get_trials(deepcopy=False, states=states):
            if set(t.params) != set(self.kind.param_names):
                continue
            c = canonical_config(from_params(self.kind, t.params))
            if c not in self.space_keys or c in self.measured:
                continue
            if t.state == TrialState.COMPLETE:
                elsewhere[c] = t.value
        for attr, owner in claims.items():
            c = attr.removeprefix("claim:")
            if attr.startswith("claim:") and owner not in FREE_CLAIMS + (self.claim_id,) and c not in self.measured:
                elsewhere.setdefault(c, None)  # another worker is measuring it (or has)
        self.elsewhere = elsewhere

    def _goal(self) -> int:
        return min(self.trials, len(self.space))

    def _best_ms(self) -> float | None:
        times = [ms for _, ms in self.order if ms is not None]
        return min(times) if times else None

    def _done(self) -> bool:
        return self._measured_in_space() >= self._goal() or time.monotonic() >= self.deadline

    def _seeds(self) -> list[Config]:
        seeds = [self.kind.default(self.spec, self.bucket, self.arch), *self.extra_seeds]
        seeds += [self.kind.complete(s) for s in neighbour_seeds(self.cache, self.key)]
        out, seen = [], set()
        for s in seeds:
            c = canonical_config(s)
            if c in self.space_keys and c not in seen:
                seen.add(c)
                out.append(s)
        return out

    def _measure_fixed(self, study: optuna.Study, config: Config) -> None:
        c = canonical_config(config)
        if c in self._taken():
            return
        if not self._claim(study, c):
            self.elsewhere.setdefault(c, None)
            return
        m = self._measure(config)
        self._add_known(study, config, m.median_ms if m.status == "ok" else None)

    def _propose(self, study: optuna.Study) -> tuple[optuna.Trial, Config] | None:
        """One TPE proposal that needs measuring, or None (told to the study right away)."""
        trial = study.ask()
        if self.worker_tag:
            trial.set_user_attr("worker_tag", self.worker_tag)
        params = {p.name: trial.suggest_int(p.name, 0, len(p.values) - 1) for p in self.kind.params}
        config = from_params(self.kind, params)
        c = canonical_config(config)
        known = self.measured.get(c)
        if c not in self.space_keys:  # rejected by the resource model: costs nothing, teaches TPE
            study.tell(trial, state=TrialState.PRUNED)
            return None
        if known is not None or c in self.elsewhere or c in self.pending:
            ms = (known.median_ms if known.status == "ok" else None) if known is not None else self.elsewhere.get(c)
            if ms is not None:
                study.tell(trial, ms)
            else:
                study.tell(trial, state=TrialState.PRUNED)
            return None
        if not self._claim(study, c):
            study.tell(trial, state=TrialState.PRUNED)
            self.elsewhere.setdefault(c, None)
            return None
        self.pending.add(c)  # taken by this batch: not proposed again
        return trial, config

    def _tpe_batch(self, study: optuna.Study) -> int:
        """Up to ``batch`` proposals (constant liar keeps them apart), compiled in parallel, then
        measured one by one. Returns how many were measured."""
        picked = []
        want = min(self.batch, self._goal() - self._measured_in_space())
        for _ in range(self.batch * 4):
            if len(picked) >= want:
                break
            proposal = self._propose(study)
            if proposal is not None:
                picked.append(proposal)
        self._precompile([config for _, config in picked])
        for trial, config in picked:
            self.pending.discard(canonical_config(config))
            if time.monotonic() >= self.deadline:
                study.tell(trial, state=TrialState.FAIL)
                continue
            m = self._measure(config)
            if m.status == "ok":
                study.tell(trial, m.median_ms)
            else:
                study.tell(trial, state=TrialState.PRUNED)
        return len(picked)

    def _precompile(self, configs: list[Config]) -> None:
        if self.compile_pool is not None and len(configs) > 1:
            self.compile_pool.compile([(self.spec, c, self.bucket) for c in configs])

    def run(self) -> SearchResult:
        t0 = time.monotonic()
        study = self._open_study()
        self._sync_from_cache(study)
        n_before = self._measured_in_space()
        brute = len(self.space) <= self.brute_force_up_to
        queue = self._seeds()
        if brute:
            queue += self.space
        todo = [c for c in queue if canonical_config(c) not in self.measured]
        self._precompile(todo[: max(0, self._goal() - self._measured_in_space())])
        for config in queue:
            self._refresh_shared(study)
            # A key always gets its first seed (the default) measured, even past its share of the
            # time budget: startup (worker spawn, parallel compiles) must not leave a bucket empty.
            if self._done() and self.measured:
                break
            self._measure_fixed(study, config)
        idle = 0
        while not (self._refresh_shared(study) or self._done()):
            if idle >= MAX_IDLE_PROPOSALS:
                taken = self._taken()
                left = [c for c in self.space if canonical_config(c) not in taken]
                if not left:
                    break
                self._measure_fixed(study, self.rng.choice(left))
                idle = 0
                continue
            idle = 0 if self._tpe_batch(study) else idle + self.batch * 4
        return self._result(n_before, brute, time.monotonic() - t0)

    def _result(self, n_before: int, brute: bool, wall: float) -> SearchResult:
        best = self.cache.best(self.key)
        default = self.kind.default(self.spec, self.bucket, self.arch)
        d = self.measured.get(canonical_config(default))
        default_ms = d.median_ms if d is not None and d.status == "ok" else None
        within = None
        if best is not None:
            for i, (_, ms) in enumerate(self.order, 1):
                if ms is not None and ms <= best.median_ms * 1.03:
                    within = i
                    break
        return SearchResult(
            key=self.key, space_size=len(self.space), brute_force=brute, measured_total=self._measured_in_space(),
            measured_now=self._measured_in_space() - n_before, best=best, default_config=default,
            default_ms=default_ms, trials_to_within_3pct=within, wall_s=wall, history=self.history,
        )


def neighbour_seeds(cache: TuningCache, key: ResultKey, limit: int = 4) -> list[Config]:
    """Best configs of the same spec on this device: first at this bucket under an older template or
    Triton version (stale, so re-measured, but the likeliest winners after a template change), then at
    other token buckets (nearest in log2 first); then other specs of the same kind: TPE's starting points."""
    same_spec = dict(kind=key.kind, n_heads=key.n_heads, n_kv_heads=key.n_kv_heads, head_dim=key.head_dim,
                     n_experts=key.n_experts, expert_dim=key.expert_dim, dtype=key.dtype, device=key.device)
    rows = [(k, t) for k, t in cache.best_rows(**same_spec) if k != key]
    rows.sort(key=lambda kt: (abs(math.log2(kt[0].bucket) - math.log2(key.bucket)), kt[1].median_ms))
    seeds = [t.config for _, t in rows[:limit]]
    others = [(k, t) for k, t in cache.best_rows(kind=key.kind, device=key.device, bucket=key.bucket)
              if k.spec != key.spec]
    seeds += [t.config for _, t in others[:limit]]
    return seeds
