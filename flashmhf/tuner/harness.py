"""One tuning problem: fresh random inputs for a kernel kind at a token count, its float64 reference,
and how to launch and check a config on them. Each role (``flashmhf.codegen.kinds.Role``) registers a
builder here; every kind of the role launches on the same arguments and writes the same outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flashmhf.checks import (
    TORCH_DTYPES,
    core_inputs,
    reference_f64,
    reference_grads_f64,
    reference_norm_router_f64,
    reference_norm_router_grads_f64,
    rel_error,
)
from flashmhf.codegen import Config, Spec, get_kind
from flashmhf.codegen.kinds import (
    BACKWARD,
    DKUV,
    DQ,
    FORWARD,
    NORM_ROUTER,
    NORM_ROUTER_BWD,
    NORM_ROUTER_CORE,
    ROUTER,
    ROUTER_BWD,
    ROUTER_CORE,
    Role,
)
from flashmhf_runtime import dispatch
from flashmhf_runtime.reference import HEAD_NORM_EPS

TOLERANCE = {"bf16": 1e-2, "fp16": 3e-3, "fp32": 1e-4}
# Gradients go through one more rounding (ds and the recomputed activations): the gradient limits of docs/design.md §3.
GRAD_TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 1e-3}


@dataclass
class Problem:
    spec: Spec
    tokens: int
    args: tuple  # positional arguments of the rendered module's launch()
    outputs: list[torch.Tensor]  # tensors the kernel writes (poisoned before each check)
    reference: list[torch.Tensor] = field(default_factory=list)  # float64 expected values, same order
    launchers: dict = field(default_factory=dict, repr=False)  # config items -> the runtime's launcher

    @property
    def tolerance(self) -> float:
        return (GRAD_TOLERANCE if get_kind(self.spec.kind).role.gradient else TOLERANCE)[self.spec.dtype]

    def run(self, config: Config) -> object:
        """One launch with ``config``, the way the runtime launches it (``dispatch.bind``): repeated
        launches replay their recorded arguments and kinds with scratch get the stream's, so a time
        is the kernel's and not Triton's per-call host work (~0.1 ms for a Gluon launch, more than
        the kernel below ~2000 tokens)."""
        key = tuple(sorted(config.items()))
        launcher = self.launchers.get(key)
        if launcher is None:
            launcher = self.launchers[key] = dispatch.bind(self.spec, config)
        return launcher(*self.args)

    def check(self, config: Config) -> float:
        """Poison the outputs, run once, return the worst relative error against the reference."""
        for out in self.outputs:
            out.fill_(float("nan"))
        self.run(config)
        return max(rel_error(out, ref) for out, ref in zip(self.outputs, self.reference))


Builder = Callable[[Spec, int, str, int, bool], Problem]
BUILDERS: dict[str, Builder] = {}  # role name -> builder


def builder(role: Role) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        BUILDERS[role.name] = fn
        return fn

    return register


def make_problem(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool = True) -> Problem:
    role = get_kind(spec.kind).role
    try:
        build = BUILDERS[role.name]
    except KeyError:
        raise ValueError(f"kind: the tuner has no harness for {spec.kind!r} (role {role.name}; roles with one: "
                         f"{', '.join(BUILDERS)})") from None
    return build(spec, tokens, device, seed, with_reference)


@builder(FORWARD)
def _fwd(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    q, k, u, v, r = core_inputs(spec, tokens, TORCH_DTYPES[spec.dtype], device, seed)
    out = torch.full_like(q, float("nan"))
    ref = [reference_f64(q, k, u, v, r)] if with_reference else []
    return Problem(spec, tokens, (q, k, u, v, r, out), [out], ref)


def _backward_inputs(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool):
    q, k, u, v, r = core_inputs(spec, tokens, TORCH_DTYPES[spec.dtype], device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    ds = torch.randn(q.shape, device=device, generator=g).to(q.dtype)
    ref = reference_grads_f64(q, k, u, v, r, ds) if with_reference else None
    return (q, k, u, v, r, ds), ref


@builder(DQ)
def _bwd_dq(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    (q, k, u, v, r, ds), ref = _backward_inputs(spec, tokens, device, seed, with_reference)
    dq, dr = torch.full_like(q, float("nan")), torch.full_like(r, float("nan"))
    return Problem(spec, tokens, (q, k, u, v, r, ds, dq, dr), [dq, dr], [ref[0], ref[4]] if ref else [])


@builder(DKUV)
def _bwd_dkuv(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    (q, k, u, v, r, ds), ref = _backward_inputs(spec, tokens, device, seed, with_reference)
    dk, du, dv = (torch.full_like(k, float("nan")) for _ in range(3))
    return Problem(spec, tokens, (q, k, u, v, r, ds, dk, du, dv), [dk, du, dv], list(ref[1:4]) if ref else [])


@builder(BACKWARD)
def _bwd_fused(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    (q, k, u, v, r, ds), ref = _backward_inputs(spec, tokens, device, seed, with_reference)
    dq, dr = torch.full_like(q, float("nan")), torch.full_like(r, float("nan"))
    dk, du, dv = (torch.full_like(k, float("nan")) for _ in range(3))
    outputs = [dq, dk, du, dv, dr]
    return Problem(spec, tokens, (q, k, u, v, r, ds, *outputs), outputs, list(ref) if ref else [])


def _norm_router_inputs(spec: Spec, tokens: int, device: str, seed: int):
    """q ~ N(0, 1) in the spec's dtype, norm weight ~ 1 + N(0, 0.1), router weights ~ N(0, 0.3 / sqrt(d_h))
    (logits of order 0.3, so the sigmoid is not flat)."""
    dtype = TORCH_DTYPES[spec.dtype]
    kw = dict(device=device, generator=torch.Generator(device=device).manual_seed(seed))
    q = torch.randn(tokens, spec.n_heads, spec.head_dim, **kw).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(spec.n_heads, spec.head_dim, **kw)).to(dtype)
    w_r = (0.3 * spec.head_dim**-0.5 * torch.randn(spec.n_heads, spec.head_dim, spec.n_experts, **kw)).to(dtype)
    return q, norm_w, w_r


@builder(ROUTER)
@builder(NORM_ROUTER)
def _norm_router(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    q, norm_w, w_r = _norm_router_inputs(spec, tokens, device, seed)
    norm = spec.kind == "norm_router"
    qn = torch.full_like(q, float("nan"))
    r = torch.full((tokens, spec.n_heads, spec.n_experts), float("nan"), device=device)
    ref = []
    if with_reference:
        qn64, r64 = reference_norm_router_f64(q, norm_w if norm else None, w_r)
        ref = [qn64, r64] if norm else [r64]
    outputs = [qn, r] if norm else [r]
    return Problem(spec, tokens, (q, norm_w, w_r, qn if norm else q, r, HEAD_NORM_EPS), outputs, ref)


@builder(ROUTER_BWD)
@builder(NORM_ROUTER_BWD)
def _norm_router_bwd(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    q, norm_w, w_r = _norm_router_inputs(spec, tokens, device, seed)
    norm = spec.kind == "norm_router_bwd"
    g = torch.Generator(device=device).manual_seed(seed + 1)
    dqn = torch.randn(q.shape, device=device, generator=g).to(q.dtype)
    dr = torch.randn(tokens, spec.n_heads, spec.n_experts, device=device, generator=g)
    dq = torch.full_like(q, float("nan"))
    dw_r = torch.full_like(w_r, float("nan"))
    dw_norm = torch.full_like(norm_w, float("nan")) if norm else dw_r
    ref = []
    if with_reference:
        dq64, dw_r64, dw_norm64 = reference_norm_router_grads_f64(q, norm_w if norm else None, w_r, dqn, dr)
        ref = [dq64, dw_r64] + ([dw_norm64] if norm else [])
    outputs = [dq, dw_r] + ([dw_norm] if norm else [])
    return Problem(spec, tokens, (q, norm_w, w_r, dqn, dr, dq, dw_r, dw_norm, HEAD_NORM_EPS), outputs, ref)


@builder(ROUTER_CORE)
@builder(NORM_ROUTER_CORE)
def _norm_router_core(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    """q before the norm, the norm/router weights and K/U/V -> s. The split's counters are kept zeroed
    between launches by the kernel itself, so one buffer (sized for the smallest row tile) serves
    every config."""
    q, norm_w, w_r = _norm_router_inputs(spec, tokens, device, seed)
    _, k, u, v, _ = core_inputs(spec, tokens, q.dtype, device, seed + 1)
    norm = spec.kind == "norm_router_core"
    out = torch.full_like(q, float("nan"))
    smallest = min(next(p for p in get_kind(spec.kind).params if p.name == "block_m").values)
    counters = torch.zeros(-(-tokens * spec.group // smallest) * spec.n_kv_heads, dtype=torch.int32, device=device)
    ref = []
    if with_reference:
        qn64, r64 = reference_norm_router_f64(q, norm_w if norm else None, w_r)
        ref = [reference_f64(qn64, k, u, v, r64)]
    args = (q, norm_w if norm else w_r, w_r, k, u, v, out, HEAD_NORM_EPS, counters)
    return Problem(spec, tokens, args, [out], ref)
