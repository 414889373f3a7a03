"""Spec + token count -> config -> launcher, memoised so a call after the first is one dict hit.

Config choice, in order: an explicit ``config``; the tuned-kernel cache (flashmhf.cache); the kind's
safe heuristic default, with a one-time warning naming the ``flashmhf tune`` command to run.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Callable

from flashmhf.cache import lookup
from flashmhf.cache.buckets import token_bucket, tune_command
from flashmhf.cache.device import DeviceInfo, device_arch, device_info
from flashmhf.codegen import Config, Spec, SpecError, format_config, get_kind, plan
from flashmhf.codegen.arch import DEFAULT_ARCH, Arch, arch_for_capability
from flashmhf_runtime.jit_memo import runtime_load
from flashmhf_runtime.replay_launch import ReplayLauncher
from flashmhf_runtime.scratch import ScratchLauncher

log = logging.getLogger("flashmhf.dispatch")

Launcher = Callable[..., object]

# (*Spec.as_tuple(), token bucket, device index) -> launcher with its config bound: a plain tuple, the
# per-call dict hit of ``launch``
_launchers: dict[tuple, Launcher] = {}
_chosen: dict[tuple, tuple[Config, str]] = {}
_warned: set[tuple] = set()
_lock = threading.Lock()


def choose_config(spec: Spec, tokens: int, device: DeviceInfo, arch: Arch | None = None) -> tuple[Config, str]:
    """The tuned config for this key if one is cached, else the heuristic default for ``arch``
    (default: the table's row for the device's capability), warning once."""
    arch = arch or arch_for_capability(device.cuda_capability)
    bucket = token_bucket(tokens)
    found = lookup.find_config(spec, bucket, device, arch)
    if found is not None:
        return found
    key = (spec, device.name)
    if key not in _warned:
        _warned.add(key)
        if not device.name.startswith("triton-interpreter"):
            warnings.warn(
                f"flashmhf: no tuned {spec.kind} kernel for {spec.label()} on {device.name}; using a default "
                f"config for {arch.name}. Tune it with: {tune_command(spec, bucket)}",
                stacklevel=4,
            )
    return get_kind(spec.kind).default(spec, bucket, arch), "default"


def bind(spec: Spec, config: Config) -> Launcher:
    """The module's launch with ``config`` bound; repeated calls on the same memory replay it. A
    module that declares ``scratch`` (a split's partials and counters) gets the stream's."""
    module = runtime_load(spec)
    launcher = ReplayLauncher(module.launch, config)
    sizes = getattr(module, "scratch", None)
    return launcher if sizes is None else ScratchLauncher(launcher, sizes, config)


def _first_launch(key: tuple, spec: Spec, tokens: int, device_index: int | None, args: tuple) -> None:
    """Slow path of the first call for a key: choose, compile, and demote a cached config that fails."""
    device = device_info(device_index)
    arch = device_arch(device_index)
    try:
        plan(spec)  # a shape no template takes: a clear ValueError, before any config is chosen
        get_kind(spec.kind).default(spec, token_bucket(tokens), arch)
    except SpecError as exc:
        raise ValueError(
            f"q, k: the generated kernels cannot take this layer shape (H={spec.n_heads}, H_kv={spec.n_kv_heads}, "
            f"d_h={spec.head_dim}, E={spec.n_experts}, d_e={spec.expert_dim}, {spec.dtype}): {exc}"
        ) from None
    config, source = choose_config(spec, tokens, device, arch)
    launcher = bind(spec, config)
    try:
        launcher(*args)
    except Exception as exc:  # noqa: BLE001 - any compile/launch failure of a cached config
        if source == "default":
            raise
        warnings.warn(
            f"flashmhf: cached config {format_config(config)} for {spec.label()} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); using the default",
            stacklevel=3,
        )
        lookup.demote(spec, token_bucket(tokens), device, config, repr(exc))
        config, source = get_kind(spec.kind).default(spec, token_bucket(tokens), arch), "default (cached demoted)"
        launcher = bind(spec, config)
        launcher(*args)
    log.debug("%s tokens=%d: config %s from %s", spec.label(), tokens, format_config(config), source)
    with _lock:
        _launchers[key] = launcher
        _chosen[key] = (config, source)


def launch(spec_key: tuple, tokens: int, device_index: int | None, *args) -> None:
    """Launch the kernel for ``spec_key`` = ``Spec.as_tuple()`` on ``args`` (its outputs are among them)."""
    key = (*spec_key, token_bucket(tokens), device_index)
    launcher = _launchers.get(key)
    if launcher is not None:
        return launcher(*args)
    spec = Spec(*spec_key)
    return _first_launch(key, spec, tokens, device_index, args)


def bound_launcher(spec_key: tuple, tokens: int, device_index: int | None) -> Launcher | None:
    """The launcher ``launch`` settled on for this key (after its first call): ``launcher(*args)``
    launches as ``launch(spec_key, tokens, device_index, *args)`` does, without its dict lookup."""
    return _launchers.get((*spec_key, token_bucket(tokens), device_index))


def memoised_config(spec_key: tuple, tokens: int, device_index: int | None) -> Config | None:
    """The config ``launch`` settled on for this key (after its first call), for callers that
    memoise further (the op's fast path)."""
    chosen = _chosen.get((*spec_key, token_bucket(tokens), device_index))
    return chosen[0] if chosen else None


@functools.lru_cache(maxsize=256)
def _explicit_launcher(spec: Spec, items: tuple[tuple[str, int], ...], arch: Arch) -> Launcher:
    config = dict(items)
    get_kind(spec.kind).check_config(spec, config, None, arch)
    return bind(spec, config)


def launch_with_config(spec_key: tuple, config: Config, *args, arch: Arch = DEFAULT_ARCH) -> None:
    """Launch with an explicit config (validated for ``arch`` once per distinct config)."""
    try:
        spec = Spec(*spec_key)
        config = get_kind(spec.kind).complete(config)  # a config pinned before a param existed
        launcher = _explicit_launcher(spec, tuple(sorted(config.items())), arch)
    except SpecError as exc:
        raise ValueError(f"config: {exc}") from None
    return launcher(*args)


def chosen_config(spec: Spec, tokens: int, device_index: int | None) -> tuple[Config, str] | None:
    """The config this process launched for ``spec`` at ``tokens`` on that device, and where it came from."""
    return _chosen.get((*spec.as_tuple(), token_bucket(tokens), device_index))


_reset_hooks: list[Callable[[], None]] = []


def on_reset(hook: Callable[[], None]) -> None:
    """Register a callback that drops memoised launchers held elsewhere (the op's fast path)."""
    _reset_hooks.append(hook)


def reset() -> None:
    """Forget everything the runtime memoised: cache files read, configs chosen, launchers bound,
    warnings given (tests, or after the cache files changed, e.g. by the tuner). Public as
    ``flashmhf_runtime.reset``."""
    lookup.invalidate()
    with _lock:
        _launchers.clear()
        _chosen.clear()
        _warned.clear()
    _explicit_launcher.cache_clear()
    for hook in _reset_hooks:
        hook()
