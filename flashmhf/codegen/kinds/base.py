"""What every kernel kind declares: its role, template, config space, constraints, default, what it
needs of the GPU architecture, and the kind that runs what it cannot (its fallback)."""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from flashmhf.codegen.arch import DEFAULT_ARCH, Arch
from flashmhf.codegen.dtypes import DTYPE_BYTES, DTYPE_TABLE  # noqa: F401 - kinds import DTYPE_BYTES from here
from flashmhf.codegen.spec import Spec

Config = dict[str, int]


@dataclass(frozen=True)
class Role:
    """What a kind computes. The runtime runs, for each role it needs, the first kind of that role
    that can run (see ``flashmhf.codegen.registry``); the tuner's harness builds one problem per role
    (``flashmhf.tuner.harness.builder``), so a kind of a new role brings its role here and a builder."""

    name: str
    computes: str  # for help texts
    gradient: bool = False  # its outputs are gradients: checked at the training tolerance
    runs: bool = True  # the runtime runs kinds of this role (False: a kind for the tuner to weigh only)


FORWARD = Role("forward", "s, the core's output")
DQ = Role("dq", "dq and dr", gradient=True)
DKUV = Role("dkuv", "dK, dU and dV", gradient=True)
BACKWARD = Role("backward", "dq, dr, dK, dU and dV in one pass", gradient=True, runs=False)
# The core op's roles; the layer op adds its head norm and router (a layer has the norm or not, so
# the variants are roles of their own, not each other's fallbacks).
CORE_ROLES = (FORWARD, DQ, DKUV)
NORM_ROUTER = Role("norm_router", "the layer's head RMSNorm (qn) and router (r)")
ROUTER = Role("router", "the layer's router (r), without a head norm")
NORM_ROUTER_BWD = Role("norm_router_bwd", "the head RMSNorm's and router's dq, dW_r, dw_norm", gradient=True)
ROUTER_BWD = Role("router_bwd", "the router's dq and dW_r", gradient=True)
# The norm (or router) and the core forward in one kernel: the layer op runs it in place of the two
# steps where it measured faster (decode sizes).
NORM_ROUTER_CORE = Role("norm_router_core", "s from the W_in output: head RMSNorm, router and core in one kernel")
ROUTER_CORE = Role("router_core", "s from the W_in output: router and core in one kernel (no head norm)")


@dataclass(frozen=True)
class Param:
    """One tunable. ``log2`` params are tile sizes: the tuner encodes them as ordinal log2 integers."""

    name: str
    values: tuple[int, ...]
    log2: bool = True
    help: str = ""
    absent: int | None = None  # a param added later: the value configs recorded before it ran with


Reject = Callable[[Spec, Config, "int | None", Arch], "str | None"]
Default = Callable[[Spec, int, Arch], Config]


@dataclass(frozen=True)
class KernelKind:
    """A kernel kind: one template plus the space of configs it can be launched with.

    ``reject_fn(spec, config, tokens, arch)`` returns the reason a config cannot work on ``arch`` (or
    ``None``); it is the single place where the space is pruned, before anything compiles. ``tokens``
    is ``None`` when the question is asked independently of a token count. ``default_fn(spec, tokens,
    arch)`` is the config to run untuned; it raises ``SpecError`` for a shape the kind cannot take.

    ``needs`` names the architecture features (``flashmhf.codegen.arch``) the kind cannot run
    without; below ``min_tokens`` tokens (or above ``max_tokens``), or where it cannot run,
    ``fallback`` (a kind of the same role) runs instead. The registry (``flashmhf.codegen.registry``)
    reads these to choose.
    """

    name: str
    template: str
    description: str
    role: Role
    params: tuple[Param, ...]
    reject_fn: Reject
    default_fn: Default
    flops: Callable[[Spec, int], float]
    needs: frozenset[str] = frozenset()
    min_tokens: int = 1
    max_tokens: int | None = None
    fallback: str | None = None
    extra_hash: tuple[str, ...] = field(default_factory=tuple)

    def unavailable(self, arch: Arch) -> str | None:
        """Why ``arch`` cannot run the kind at all (None: it can)."""
        return arch.missing(self.needs)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @cached_property
    def space_hash(self) -> str:
        """Hash of the declared values and the constraint code (the whole module that defines
        ``reject_fn``, so resource estimates and thresholds count too): results from another space
        differ. The runtime does not look at it; the tuner starts a new study when it changes."""
        h = hashlib.sha256()
        for p in self.params:
            h.update(f"{p.name}={p.values};".encode())
        h.update(inspect.getsource(inspect.getmodule(self.reject_fn)).encode())
        for extra in self.extra_hash:
            h.update(extra.encode())
        return h.hexdigest()[:16]

    def token_reason(self, tokens: int | None) -> str | None:
        """Why the kind does not run at ``tokens`` (None: it does, or ``tokens`` is None)."""
        if tokens is None:
            return None
        if tokens < self.min_tokens:
            return f"{self.name} runs from {self.min_tokens} tokens ({self.fallback or 'another kind'} below)"
        if self.max_tokens is not None and tokens > self.max_tokens:
            return f"{self.name} runs up to {self.max_tokens} tokens (another kind above)"
        return None

    def reject(self, spec: Spec, config: Config, tokens: int | None = None, arch: Arch = DEFAULT_ARCH) -> str | None:
        """Why ``config`` cannot run ``spec`` at ``tokens`` on ``arch`` (None: it can)."""
        return self.token_reason(tokens) or self.reject_fn(spec, config, tokens, arch)

    def default(self, spec: Spec, tokens: int, arch: Arch = DEFAULT_ARCH) -> Config:
        """The config to run ``spec`` at ``tokens`` with on ``arch`` when nothing is tuned."""
        return self.default_fn(spec, tokens, arch)

    def shape_reason(self, spec: Spec, arch: Arch = DEFAULT_ARCH) -> str | None:
        """Why the kind cannot take ``spec``'s layer shape and dtype on ``arch`` with any config (None:
        it can): the code generator's checks, then the kind's ``default``, which raises ``SpecError``
        for exactly the shapes no config fits."""
        from flashmhf.codegen.spec import SpecError, validate_spec

        try:
            validate_spec(spec, (self.name,))
            self.default(spec, 1, arch)
        except SpecError as exc:
            return str(exc)
        return None

    def complete(self, config: Config) -> Config:
        """``config`` with every param added since it was written set to its ``absent`` value (what the
        template did before the param existed), so older cache rows and pinned configs stay usable."""
        missing = {p.name: p.absent for p in self.params if p.name not in config and p.absent is not None}
        return {**config, **missing} if missing else config

    def check_config(self, spec: Spec, config: Config, tokens: int | None = None,
                     arch: Arch = DEFAULT_ARCH) -> None:
        """Raise ``SpecError`` if ``config`` is malformed or rejected for ``spec`` on ``arch``."""
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
        reason = self.reject(spec, config, tokens, arch)
        if reason:
            raise SpecError(f"{format_config(config)} rejected for {spec.label()} on {arch.name}: {reason}")

    def space(self, spec: Spec, tokens: int | None = None, arch: Arch = DEFAULT_ARCH) -> Iterator[Config]:
        """Every declared config that the constraints accept on ``arch``, in a deterministic order."""
        for values in itertools.product(*(p.values for p in self.params)):
            config = dict(zip(self.param_names, values))
            if self.reject(spec, config, tokens, arch) is None:
                yield config

    def space_size(self) -> int:
        n = 1
        for p in self.params:
            n *= len(p.values)
        return n


def first_accepted(reject: Reject, spec: Spec, arch: Arch, candidates: Iterable[Config], kind: str = "") -> Config:
    """The first candidate the constraints accept on ``arch``: how each kind turns its preferences
    into a default. ``SpecError`` (naming the last reason) when none fits: the runtime then runs the
    kind's fallback, or the reference."""
    from flashmhf.codegen.spec import SpecError

    reason = "no candidates"
    for c in candidates:
        reason = reject(spec, c, None, arch)
        if reason is None:
            return c
    raise SpecError(f"no {kind or spec.kind} config fits {spec.label()} on {arch.name}: {reason}")


def resource_reason(smem: int, regs: int | None, arch: Arch) -> str | None:
    """Why estimated shared memory (bytes per block) or registers (per thread) exceed ``arch``."""
    if smem > arch.smem_per_block:
        return f"needs ~{smem // 1024} KiB shared memory, more than {arch.smem_per_block // 1024} KiB on {arch.name}"
    if regs is not None and regs > arch.regs_per_thread:
        return f"needs ~{regs} registers per thread (> {arch.regs_per_thread}): would spill"
    return None


def fma_products(spec: Spec) -> bool:
    """Whether ``spec``'s products are exact FMA loops (fp32 inputs) rather than tensor-core MMAs."""
    return DTYPE_TABLE[spec.dtype].exact


def fma_product_regs(rows: int, cols: int, depth: int, warps: int) -> int:
    """Per-thread registers of an exact (FMA) product of a (rows x depth) by a (depth x cols) tile:
    each thread keeps both operands along the whole depth for its share of the outputs. Calibrated
    on ptxas reports (sm_80, sm_86, sm_90; fp32 fwd, bwd_dq, bwd_dkuv and the norm/router kinds at
    d_h 96 and 128): every config whose count with this term stays within the registers compiled
    without spills; most with twice the tile spill (often by kilobytes: ptxas gives up)."""
    return rows * cols * depth // (32 * warps)


def format_config(config: Config) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items())


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b."""
    return -(-a // b)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
