"""Do the untuned defaults fit each GPU target? Compile them here (ptxas, no GPU needed) and check.

A kind's ``default`` is what runs on a GPU nobody tuned for. For each architecture of the table,
each kind the runtime would run there and each token bucket, this compiles the default config for
that architecture (through ``kernel_resources``, the machinery of ``flashmhf show --resources``)
and checks that it spills no register and fits the architecture's shared memory per block. Token
buckets that share a default config are compiled once.

    python -m benchmarks.check_defaults            # the presets, every arch that is checked
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flashmhf.cache.buckets import TUNED_BUCKETS
from flashmhf.codegen import Config, Spec, get_kind, registry
from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import Role
from flashmhf.tuner.resources import KernelReport, kernel_resources

BUCKETS = TUNED_BUCKETS


@dataclass(frozen=True)
class DefaultReport:
    """The compiled kernels of one default config: ``spec`` on ``arch`` at ``buckets``."""

    spec: Spec
    arch: Arch
    buckets: tuple[int, ...]
    config: Config
    kernels: tuple[KernelReport, ...]

    @property
    def spill_bytes(self) -> int:
        return max((k.spill_bytes or 0) for k in self.kernels)

    @property
    def shared_bytes(self) -> int:
        return max(k.shared_bytes for k in self.kernels)

    @property
    def ok(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= self.arch.smem_per_block \
            and all(k.spill_bytes is not None for k in self.kernels)


def runtime_specs(shape: tuple, dtype: str, arch: Arch, buckets: Iterable[int] = BUCKETS,
                  roles: Iterable[Role] | None = None) -> list[Spec]:
    """The specs of every kind the runtime would run for ``shape`` = (H, H_kv, d_h, E, d_e) in
    ``dtype`` on ``arch`` at some of ``buckets`` (for each of ``roles``, default every role the
    runtime runs, each kind the registry picks)."""
    base = Spec("", *shape, dtype)
    roles = registry.runtime_roles() if roles is None else list(roles)
    kinds = {registry.choose(role, base, b, arch) for role in roles for b in buckets}
    return [Spec(k, *shape, dtype) for k in sorted(kinds - {None})]


def roles_without_kernel(shape: tuple, dtype: str, arch: Arch, buckets: Iterable[int] = BUCKETS,
                         roles: Iterable[Role] | None = None) -> list[tuple[Role, str]]:
    """(role, why) for each of ``roles`` (default every role the runtime runs) that no kind runs for
    ``shape`` in ``dtype`` on ``arch`` at any of ``buckets``: the caller runs PyTorch there."""
    base = Spec("", *shape, dtype)
    roles = registry.runtime_roles() if roles is None else list(roles)
    return [(role, registry.reason(role, base, arch)) for role in roles
            if all(registry.choose(role, base, b, arch) is None for b in buckets)]


def _configs_by_default(spec: Spec, arch: Arch, buckets: Iterable[int]) -> list[tuple[Config, tuple[int, ...]]]:
    kind = get_kind(spec.kind)
    grouped: dict[tuple, tuple[Config, list[int]]] = {}
    for b in buckets:
        if kind.token_reason(b):
            continue
        config = kind.default(spec, b, arch)
        grouped.setdefault(tuple(sorted(config.items())), (config, []))[1].append(b)
    return [(config, tuple(bs)) for config, bs in grouped.values()]


def check_defaults(specs: Iterable[Spec], archs: Iterable[Arch], buckets: Iterable[int] = BUCKETS,
                   on_report: Callable[[DefaultReport], None] | None = None) -> list[DefaultReport]:
    """Compile the default config of every spec at every bucket for every arch (each distinct
    config once); kinds an arch cannot run are left out. ``on_report`` sees each result as it comes."""
    buckets = tuple(buckets)
    reports = []
    for arch in archs:
        for spec in specs:
            if get_kind(spec.kind).unavailable(arch):
                continue
            for config, used_at in _configs_by_default(spec, arch, buckets):
                kernels = kernel_resources(spec, config, tokens=max(used_at), capability=arch.capability_number)
                report = DefaultReport(spec, arch, used_at, config, tuple(kernels))
                reports.append(report)
                if on_report:
                    on_report(report)
    return reports
