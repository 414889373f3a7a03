"""One Optuna study per (kind, spec, token bucket, device): seeded, budgeted, resumable.

Order of measurement: the default and any given configs, then configs that were fast elsewhere (the
same kind at neighbouring token buckets and for other shapes, from the cache files in effect:
``tuner.seeds``); then rounds of the untried one-step neighbours of the LOCAL_TOP fastest configs so
far, and TPE proposals once those are all measured. The fast region of a kernel's space is narrow:
at T = 16384 one config in 134 was within 3 % of the best and its one-step neighbours were 25-65 %
slower, but it is a neighbour of the runner-up, and a walk from good configs reaches it within a
small budget where a cold TPE start sometimes does not.

Configs are encoded as ordinal integers (the index into each declared value list; for tile sizes
that is log2), so TPE can model "bigger/smaller" instead of unrelated categories. Points the
resource model rejects and points that fail to compile are told as PRUNED (TPE ranks them below
every completed trial); wrong results too, and they are never selected. Every measurement goes to
the cache first, and every measurement already in the cache is given to the study instead of
being measured again.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from flashmhf.cache.device import DeviceInfo
from flashmhf.cache.store import ResultKey, Trial, TuningCache, canonical_config
from flashmhf.codegen import Config, KernelKind, Spec, get_kind
from flashmhf.codegen.arch import Arch, arch_for_capability
from flashmhf.tuner.measure import Measurement
from flashmhf.tuner.precompile import CompilePool
from flashmhf.tuner.seeds import Space, neighbours, open_seed_caches, seed_cache_paths, transfer_seeds
from flashmhf.tuner.worker import MeasureWorker

# After this many proposals in a row that need no measurement (rejected or already measured), the
# search takes an unmeasured config at random: TPE on a small discrete space repeats itself.
MAX_IDLE_PROPOSALS = 40
# Several workers on one study: a worker claims a config, waits this long, and measures it only if
# its claim is the one that stuck (last writer wins in every Optuna storage).
CLAIM_SETTLE_S = 0.3
# Claim values that leave a config free: never claimed, or released after its worker died.
FREE_CLAIMS: tuple = (None, "released")
# Configs whose untried one-step neighbours a round tries before asking TPE (fastest first).
LOCAL_TOP = 3
# Seeds from other keys (neighbouring buckets, other shapes): at most this share of the budget
# (and at least MIN_TRANSFER_SEEDS), so that most of it is left to the search around them.
TRANSFER_SHARE = 0.25
MIN_TRANSFER_SEEDS = 2
# Measured for every key even past its share of the time budget: the default, any given configs and
# this many transfer seeds (the nearest other key's best: for fp16, bf16's best at the same shape and
# bucket), so a short budget over many keys still tries the likeliest best beside the default.
SURE_TRANSFER_SEEDS = 1


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
    s = key.spec
    return (
        f"flashmhf:{s.kind}:H{s.n_heads}-{s.n_kv_heads}:dh{s.head_dim}:E{s.n_experts}x{s.expert_dim}:"
        f"{s.dtype}:T{key.bucket}:{key.device}:sm{key.capability}:triton{key.triton_version}:"
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
        seed_caches: list[Path] | None = None,
        space: list[Config] | None = None,
        arch: Arch | None = None,
        deadline_cap: float | None = None,
    ) -> None:
        """``seed_caches``: cache files whose results seed the study besides ``cache`` (None: the files
        in effect, as the runtime reads them); ``space``: the configs to search (default: the kind's
        pruned space at ``bucket``; the offline replay passes the configs of a measured table);
        ``deadline_cap``: how far waiting for compiles may move ``deadline`` (the run's own deadline;
        None: not at all)."""
        self.spec, self.bucket, self.device = spec, bucket, device
        # What the space is pruned for and the default chosen for: the device's (its table row by default).
        self.arch = arch or arch_for_capability(device.cuda_capability)
        self.kind = get_kind(spec.kind)
        self.key = ResultKey.for_spec(spec, bucket, device)
        self.cache, self.storage, self.worker = cache, storage, worker
        self.trials, self.deadline, self.deadline_cap = trials, deadline, deadline_cap
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
        self.seed_caches = seed_cache_paths() if seed_caches is None else list(seed_caches)
        self.space = list(self.kind.space(spec, bucket, self.arch)) if space is None else list(space)
        self.space_index = Space(self.kind, self.space)
        self.space_keys = self.space_index.keys
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

    def _seeds(self) -> tuple[list[Config], int]:
        """The default, the given configs, then configs fast at other keys (at most a share of the
        budget); and how many of them lead the list that are measured whatever the time budget."""
        own = [self.kind.default(self.spec, self.bucket, self.arch), *(self.kind.complete(s) for s in self.extra_seeds)]
        limit = max(MIN_TRANSFER_SEEDS, int(self._goal() * TRANSFER_SHARE))
        others = open_seed_caches(self.seed_caches, exclude=self.cache.path)
        try:
            transfer = transfer_seeds([self.cache, *others], self.key, self.space_index, limit)
        finally:
            for other in others:
                other.close()
        out, seen = [], set()
        n_own = n_transfer = 0  # distinct configs kept of each: own ones lead the list
        for mine, s in [(True, s) for s in own] + [(False, s) for s in transfer]:
            s = self.space_index.project(s)  # e.g. a given config, or the default outside a replayed table
            if s is None or (c := canonical_config(s)) in seen:
                continue
            seen.add(c)
            out.append(s)
            n_own, n_transfer = n_own + mine, n_transfer + (not mine)
        return out, n_own + min(n_transfer, SURE_TRANSFER_SEEDS)

    def _local_candidates(self, n: int) -> list[Config]:
        """Up to ``n`` untried configs one step from the fastest config measured so far (here or, in a
        shared study, by other workers) that has any, among the LOCAL_TOP fastest: best-first, so a
        seed that misled costs one round, not the budget."""
        times = {c: t.median_ms for c, t in self.measured.items() if t.status == "ok" and c in self.space_keys}
        times.update({c: ms for c, ms in self.elsewhere.items() if ms is not None})
        taken = self._taken()
        for c in sorted(times, key=times.get)[:LOCAL_TOP]:
            untried = [config for config in neighbours(self.kind, self.space_index.config(c))
                       if (nc := canonical_config(config)) in self.space_keys and nc not in taken]
            if untried:
                return untried[:n]
        return []

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

    def _round(self, study: optuna.Study) -> int:
        """Up to ``batch`` configs, compiled in parallel, then measured one by one: the untried
        neighbours of the fastest so far while there are any (a walk to the nearest optimum, which a
        partly filled batch reaches sooner than one padded with guesses), else TPE proposals
        (constant liar keeps them apart). Returns how many."""
        want = min(self.batch, self._goal() - self._measured_in_space())
        picked: list[tuple[optuna.Trial | None, Config]] = [(None, c) for c in self._local_candidates(want)]
        self.pending.update(canonical_config(c) for _, c in picked)
        for _ in range(0 if picked else self.batch * 4):
            if len(picked) >= want:
                break
            proposal = self._propose(study)
            if proposal is not None:
                picked.append(proposal)
        self._precompile([config for _, config in picked])
        for trial, config in picked:
            self.pending.discard(canonical_config(config))
            if time.monotonic() >= self.deadline:
                if trial is not None:
                    study.tell(trial, state=TrialState.FAIL)
                continue
            if trial is None:  # a neighbour: claimed (shared study), measured and told like a seed
                self._measure_fixed(study, config)
                continue
            m = self._measure(config)
            if m.status == "ok":
                study.tell(trial, m.median_ms)
            else:
                study.tell(trial, state=TrialState.PRUNED)
        return len(picked)

    def _precompile(self, configs: list[Config]) -> None:
        self._wait_compiles(self._start_compiles(configs))

    def _wait_compiles(self, futures: list[cf.Future]) -> None:
        """Wait for compiles; the wait moves the deadline (up to ``deadline_cap``). A share is for
        measuring: the first key of a run compiles configs that its later keys load from Triton's
        cache (seconds a round on a GPU host), and the later keys' shares come from what is left."""
        waited = time.monotonic()
        cf.wait(futures)
        if self.deadline_cap is not None:
            self.deadline = min(self.deadline + time.monotonic() - waited, max(self.deadline, self.deadline_cap))

    def _start_compiles(self, configs: list[Config]) -> list[cf.Future]:
        """Compiles of ``configs`` started in the pool (none without one, or for a single config:
        the measuring worker compiles that one itself)."""
        if self.compile_pool is None or len(configs) <= 1:
            return []
        return self.compile_pool.submit([(self.spec, c, self.bucket) for c in configs])

    def run(self) -> SearchResult:
        t0 = time.monotonic()
        study = self._open_study()
        self._sync_from_cache(study)
        n_before = self._measured_in_space()
        if self.on_measure:  # where this key starts: done already when a run is repeated
            self.on_measure(None, n_before, self._goal(), self._best_ms())
        brute = len(self.space) <= self.brute_force_up_to
        queue, sure = self._seeds()
        if brute:
            queue += self.space
        todo = [c for c in queue if canonical_config(c) not in self.measured]
        todo = todo[: max(0, self._goal() - self._measured_in_space())]
        # All of them compile in parallel, the sure seeds first; measuring waits for the sure ones
        # only, and the rest go on compiling meanwhile (a spent share cancels those not started).
        n_first = min(len(todo), sum(canonical_config(c) not in self.measured for c in queue[:sure]))
        compiling = self._start_compiles(todo)
        self._wait_compiles(compiling[:n_first])
        for i, config in enumerate(queue):
            self._refresh_shared(study)
            # A key always gets its sure seeds (the default, given configs, the nearest key's best)
            # measured, even past its share of the time budget: startup (worker spawn, parallel
            # compiles) must not leave a bucket with nothing but the default.
            if self._measured_in_space() >= self._goal() or (self._done() and i >= sure and self.measured):
                break
            if i == sure:
                self._wait_compiles(compiling[n_first:])
            self._measure_fixed(study, config)
        for future in compiling:
            future.cancel()
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
            idle = 0 if self._round(study) else idle + self.batch * 4
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

