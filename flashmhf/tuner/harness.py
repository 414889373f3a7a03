"""One tuning problem: fresh random inputs for a kernel kind at a token count, its float64 reference,
and how to launch and check a config on them. Each role (``flashmhf.codegen.kinds.Role``) registers a
builder here; every kind of the role launches on the same arguments and writes the same outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flashmhf.checks import TORCH_DTYPES, core_inputs, reference_f64, reference_grads_f64, rel_error
from flashmhf.codegen import Config, Spec, get_kind, load
from flashmhf.codegen.kinds import BACKWARD, DKUV, DQ, FORWARD, Role

TOLERANCE = {"bf16": 1e-2, "fp16": 3e-3, "fp32": 1e-4}
# Gradients go through one more rounding (ds and the recomputed activations): DESIGN's training limits.
GRAD_TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 1e-3}


@dataclass
class Problem:
    spec: Spec
    tokens: int
    args: tuple  # positional arguments of the rendered module's launch()
    outputs: list[torch.Tensor]  # tensors the kernel writes (poisoned before each check)
    reference: list[torch.Tensor] = field(default_factory=list)  # float64 expected values, same order

    @property
    def tolerance(self) -> float:
        return (GRAD_TOLERANCE if get_kind(self.spec.kind).role.gradient else TOLERANCE)[self.spec.dtype]

    def run(self, config: Config) -> object:
        return load(self.spec).launch(*self.args, **config)

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
