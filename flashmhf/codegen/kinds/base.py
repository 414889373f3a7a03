"""What every kernel kind declares: its template, config space, constraints and default."""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from flashmhf.codegen.dtypes import DTYPE_BYTES  # noqa: F401 - kinds import it from here
from flashmhf.codegen.spec import Spec

# Hopper: 227 KiB of shared memory per block, 64K 32-bit registers per SM.
SMEM_BYTES = 232_448
MAX_REGS_PER_THREAD = 255

Config = dict[str, int]


@dataclass(frozen=True)
class Param:
    """One tunable. ``log2`` params are tile sizes: the tuner encodes them as ordinal log2 integers."""

    name: str
    values: tuple[int, ...]
    log2: bool = True
    help: str = ""
    absent: int | None = None  # a param added later: the value configs recorded before it ran with


@dataclass(frozen=True)
class KernelKind:
    """A kernel kind: one template plus the space of configs it can be launched with.

    ``reject(spec, config, tokens)`` returns the reason a config cannot work (or ``None``); it is
    the single place where the space is pruned, before anything compiles. ``tokens`` is ``None``
    when the question is asked independently of a token count.
    """

    name: str
    template: str
    description: str
    params: tuple[Param, ...]
    reject: Callable[[Spec, Config, int | None], str | None]
    default: Callable[[Spec, int], Config]
    flops: Callable[[Spec, int], float]
    extra_hash: tuple[str, ...] = field(default_factory=tuple)
    # Why a device of compute capability (major, minor) -- None: no CUDA device -- cannot run the
    # kind (None: it can). Unset: the kind runs wherever Triton does, the interpreter included.
    device_reason: Callable[[tuple[int, int] | None], str | None] | None = None

    def unavailable(self, capability: tuple[int, int] | None) -> str | None:
        """Why this machine (``capability``; None: no CUDA device) cannot run the kind, or None."""
        return self.device_reason(capability) if self.device_reason else None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @cached_property
    def space_hash(self) -> str:
        """Hash of the declared values and the constraint code (the whole module that defines
        ``reject``, so resource estimates and thresholds count too): results from another space differ."""
        h = hashlib.sha256()
        for p in self.params:
            h.update(f"{p.name}={p.values};".encode())
        h.update(inspect.getsource(inspect.getmodule(self.reject)).encode())
        for extra in self.extra_hash:
            h.update(extra.encode())
        return h.hexdigest()[:16]

    def shape_reason(self, spec: Spec) -> str | None:
        """Why the kind cannot take ``spec``'s layer shape and dtype with any config (None: it can).
        A kind's ``default`` raises ``SpecError`` for exactly those shapes."""
        from flashmhf.codegen.spec import SpecError

        try:
            self.default(spec, 1)
        except SpecError as exc:
            return str(exc)
        return None

    def complete(self, config: Config) -> Config:
        """``config`` with every param added since it was written set to its ``absent`` value (what the
        template did before the param existed), so older cache rows and pinned configs stay usable."""
        missing = {p.name: p.absent for p in self.params if p.name not in config and p.absent is not None}
        return {**config, **missing} if missing else config

    def check_config(self, spec: Spec, config: Config, tokens: int | None = None) -> None:
        """Raise ``SpecError`` if ``config`` is malformed or rejected for ``spec``."""
        from flashmhf.codegen.spec import SpecError

        missing = [n for n in self.param_names if n not in config]
        unknown = [n for n in config if n not in self.param_names]
        if missing or unknown:
            raise SpecError(
                f"config for kind {self.name!r} must have keys {', '.join(self.param_names)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)}" if unknown else "")
            )
        for p in self.params:
            value = config[p.name]
            lowest = 1 if p.log2 else 0  # tile sizes are positive; switches and depths may be 0
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise SpecError(f"config {p.name} must be an integer >= {lowest}, got {value!r}")
        reason = self.reject(spec, config, tokens)
        if reason:
            raise SpecError(f"{format_config(config)} rejected for {spec.label()}: {reason}")

    def space(self, spec: Spec, tokens: int | None = None) -> Iterator[Config]:
        """Every declared config that the constraints accept, in a deterministic order."""
        for values in itertools.product(*(p.values for p in self.params)):
            config = dict(zip(self.param_names, values))
            if self.reject(spec, config, tokens) is None:
                yield config

    def space_size(self) -> int:
        n = 1
        for p in self.params:
            n *= len(p.values)
        return n


def first_accepted(
    reject: Callable[[Spec, Config, int | None], str | None], spec: Spec, candidates: Iterable[Config]
) -> Config:
    """The first candidate the constraints accept: how each kind turns its preferences into a default."""
    for c in candidates:
        if reject(spec, c, None) is None:
            return c
    from flashmhf.codegen.spec import SpecError

    raise SpecError(f"no config of kind {spec.kind} fits {spec.label()}")


def format_config(config: Config) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items())


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b."""
    return -(-a // b)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
