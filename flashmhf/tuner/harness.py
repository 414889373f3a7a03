"""One tuning problem: fresh random inputs for a kernel kind at a token count, its float64 reference,
and how to launch and check a config on them. Each kind registers a builder here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flashmhf.checks import core_inputs, reference_f64, rel_error
from flashmhf.codegen import Config, Spec, load

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"bf16": 1e-2, "fp16": 3e-3, "fp32": 1e-4}


@dataclass
class Problem:
    spec: Spec
    tokens: int
    args: tuple  # positional arguments of the rendered module's launch()
    outputs: list[torch.Tensor]  # tensors the kernel writes (poisoned before each check)
    reference: list[torch.Tensor] = field(default_factory=list)  # float64 expected values, same order

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.spec.dtype]

    def run(self, config: Config) -> object:
        return load(self.spec).launch(*self.args, **config)

    def check(self, config: Config) -> float:
        """Poison the outputs, run once, return the worst relative error against the reference."""
        for out in self.outputs:
            out.fill_(float("nan"))
        self.run(config)
        return max(rel_error(out, ref) for out, ref in zip(self.outputs, self.reference))


Builder = Callable[[Spec, int, str, int, bool], Problem]
BUILDERS: dict[str, Builder] = {}


def builder(kind: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        BUILDERS[kind] = fn
        return fn

    return register


def make_problem(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool = True) -> Problem:
    try:
        build = BUILDERS[spec.kind]
    except KeyError:
        raise ValueError(f"kind: the tuner has no harness for {spec.kind!r} (known: {', '.join(BUILDERS)})") from None
    return build(spec, tokens, device, seed, with_reference)


@builder("fwd")
def _fwd(spec: Spec, tokens: int, device: str, seed: int, with_reference: bool) -> Problem:
    q, k, u, v, r = core_inputs(spec, tokens, TORCH_DTYPES[spec.dtype], device, seed)
    out = torch.full_like(q, float("nan"))
    ref = [reference_f64(q, k, u, v, r)] if with_reference else []
    return Problem(spec, tokens, (q, k, u, v, r, out), [out], ref)
