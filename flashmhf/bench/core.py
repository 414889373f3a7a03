"""Time the core op (as models call it: dispatch picks the cached or default config) next to SwiGLU."""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, replace

import torch

from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.timing import GRAPH_TOKENS, ffn_flop, median_ms, paired_median_ms, peak_mib, tflops
from flashmhf.checks import TORCH_DTYPES, core_inputs, reference_f64, reference_grads_f64, rel_error
from flashmhf.codegen import Spec, format_config

BACKWARD_ROLES = ("dq", "dkuv")  # the op's backward: one kernel for dq, dr and one for dK, dU, dV


@dataclass
class CoreRow:
    tokens: int
    backward: bool
    flashmhf_ms: float
    swiglu_ms: float
    swiglu_compiled_ms: float | None
    flop: float
    rel_err: float
    config: str  # the forward's config
    config_source: str
    peak_mib: float | None = None
    swiglu_peak_mib: float | None = None
    backward_configs: dict[str, str] | None = None  # role -> "kind: config (source)", with backward

    @property
    def flashmhf_tflops(self) -> float:
        return tflops(self.flop, self.flashmhf_ms)

    @property
    def swiglu_tflops(self) -> float:
        return tflops(self.flop, self.swiglu_ms)

    def to_dict(self) -> dict:
        return {**asdict(self), "flashmhf_tflops": self.flashmhf_tflops, "swiglu_tflops": self.swiglu_tflops}


def bench_core(spec: Spec, d_ff: int, tokens: int, *, backward: bool, compile_swiglu: bool) -> CoreRow:
    """One row: the op at ``tokens`` (forward, or forward+backward) and SwiGLU of the same d_ff."""
    import flashmhf_runtime as fm

    dtype = TORCH_DTYPES[spec.dtype]
    q, k, u, v, r = core_inputs(spec, tokens, dtype, "cuda", seed=tokens)
    x = torch.randn(tokens, spec.d_model, device="cuda", dtype=dtype)
    w = swiglu_weights(spec.d_model, d_ff, "cuda", dtype)
    graph = tokens <= GRAPH_TOKENS and not backward
    if backward:
        leaves = [t.requires_grad_() for t in (q, k, u, v, r)]
        x.requires_grad_()
        for t in w:
            t.requires_grad_()
        ds = torch.randn_like(q)
        dy = torch.randn_like(x)
        op = lambda: torch.autograd.grad(fm.flash_mhf(*leaves), leaves, ds)  # noqa: E731
        sw = lambda: torch.autograd.grad(swiglu(x, *w), (x, *w), dy)  # noqa: E731
        got = op()
        ref = reference_grads_f64(q, k, u, v, r, ds)
        err = max(rel_error(g, rf) for g, rf in zip(got, ref))
    else:
        op = lambda: fm.flash_mhf(q, k, u, v, r)  # noqa: E731
        sw = lambda: swiglu(x, *w)  # noqa: E731
        err = rel_error(op(), reference_f64(q, k, u, v, r))
    flop = ffn_flop(tokens, sum(t.numel() for t in w), backward)
    ms, sw_ms = paired_median_ms(op, sw, graph=graph)
    sw_c = None
    if compile_swiglu:
        compiled = torch.compile(swiglu)
        swc = (lambda: torch.autograd.grad(compiled(x, *w), (x, *w), dy)) if backward else (lambda: compiled(x, *w))
        sw_c = median_ms(swc)
    kind = _kind_that_ran(spec, "forward", tokens)
    config, source = _chosen(replace(spec, kind=kind), tokens)
    if kind != "fwd":
        config = f"{kind}: {config}"
    if not backward:
        return CoreRow(tokens, backward, ms, sw_ms, sw_c, flop, err, config, source)
    bwd = {role: _backward_choice(spec, role, tokens) for role in BACKWARD_ROLES}
    return CoreRow(tokens, backward, ms, sw_ms, sw_c, flop, err, config, source, peak_mib(op), peak_mib(sw), bwd)


def _kind_that_ran(spec: Spec, role: str, tokens: int) -> str:
    """The kind the op runs for one role (forward, dq, dkuv): on Hopper GPUs a warp-specialized one."""
    from flashmhf_runtime import op

    return op.kernel_kinds(astuple(spec)[1:], tokens, torch.device("cuda", torch.cuda.current_device()))[role]


def _backward_choice(spec: Spec, role: str, tokens: int) -> str:
    """Kind, config and source of the kernel that ran for one backward role."""
    kind = _kind_that_ran(spec, role, tokens)
    return "{}: {} ({})".format(kind, *_chosen(replace(spec, kind=kind), tokens))


def _chosen(spec: Spec, tokens: int) -> tuple[str, str]:
    """The config the op launched for ``spec`` at ``tokens`` and where it came from."""
    from flashmhf_runtime import dispatch

    config, source = dispatch.chosen_config(spec, tokens, torch.cuda.current_device()) or ({}, "?")
    return format_config(config), source
