"""The whole FlashMHF layer (W_in, optional head RMSNorm, router, core, W_out) next to a SwiGLU FFN of
the same d_ff: time and, for a training step, the peak memory it adds.

The core benchmark (``bench.core``) times the kernels alone; what a model pays per layer also holds
the projections, the router and their saved activations, and SwiGLU's own T x d_ff intermediates.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from flashmhf.bench.baselines import swiglu, swiglu_weights
from flashmhf.bench.timing import ffn_flop, host_ms, median_ms, paired_median_ms, peak_mib
from flashmhf.checks import rel_error

CHECK_TOKENS = 1024  # the layer is position-wise: its first tokens are checked against float64


@dataclass
class LayerRow:
    tokens: int
    backward: bool
    flashmhf_ms: float
    swiglu_ms: float
    swiglu_compiled_ms: float | None
    rel_err: float  # output (and, with backward, dx) against the float64 layer
    flashmhf_params: int
    swiglu_params: int
    flashmhf_peak_mib: float | None = None
    swiglu_peak_mib: float | None = None
    swiglu_compiled_peak_mib: float | None = None
    flashmhf_compiled_ms: float | None = None  # the layer under torch.compile (with compile_models)
    flashmhf_compiled_peak_mib: float | None = None
    flashmhf_graph_ms: float | None = None  # CUDA-graph replay (launch gaps removed)
    swiglu_graph_ms: float | None = None
    flashmhf_host_ms: float | None = None  # host time of one call (forward or training step)
    swiglu_host_ms: float | None = None
    flop: float | None = None  # the SwiGLU FFN's work (timing.ffn_flop): what TFLOP/s are rated by

    def to_dict(self) -> dict:
        return asdict(self)


def training_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``x`` and of every parameter of ``module`` for output gradient ``dy``."""
    return torch.autograd.grad(module(x), (x, *module.parameters()), dy)


def reference_layer(module: nn.Module) -> nn.Module:
    """A float64 copy of a ``FlashMHF`` layer whose core is the reference implementation."""
    from flashmhf_runtime import reference

    ref = copy.deepcopy(module).double()
    ref.core_fn = reference.flash_mhf
    return ref


def layer_error(module: nn.Module, x: torch.Tensor, dy: torch.Tensor | None) -> float:
    """Relative error of the output (and of dx when ``dy`` is given) on the first CHECK_TOKENS
    tokens against ``reference_layer(module)``."""
    ref = reference_layer(module)
    xs = x.detach().reshape(-1, x.shape[-1])[:CHECK_TOKENS]
    x64 = xs.double().requires_grad_(dy is not None)
    if dy is None:
        with torch.no_grad():
            return rel_error(module(xs), ref(x64))
    xs.requires_grad_()
    y, y64 = module(xs), ref(x64)
    dys = dy.reshape(-1, dy.shape[-1])[:CHECK_TOKENS]
    (dx,) = torch.autograd.grad(y, xs, dys)
    (dx64,) = torch.autograd.grad(y64, x64, dys.double())
    return max(rel_error(y.detach(), y64.detach()), rel_error(dx, dx64))


def saved_bytes_by_dtype(fn) -> dict[torch.dtype, int]:
    """Bytes that ``fn()`` saves for backward, per dtype, each storage counted once (any device but
    meta). What a model keeps alive per layer until its backward, so what multiplies with depth."""
    seen: set[tuple[int, torch.dtype]] = set()
    total: dict[torch.dtype, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[t.dtype] = total.get(t.dtype, 0) + t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def bench_layer(module: nn.Module, tokens: int, *, backward: bool, compile_models: bool, seed: int = 0) -> LayerRow:
    """One row on the GPU: ``module`` (a FlashMHF layer on CUDA) at ``tokens`` next to a SwiGLU FFN of
    width ``module.d_ff`` in the same dtype; forward, or a training step (gradients of the input and
    of every weight) with its peak memory. Every row is also timed as a CUDA-graph replay (what
    launch overhead leaves of it) and reports the host time of one call. ``compile_models`` also times both under
    torch.compile."""
    p = next(module.parameters())
    gen = torch.Generator(device=p.device).manual_seed(seed)
    x = torch.randn(tokens, module.d_model, device=p.device, dtype=p.dtype, generator=gen)
    dy = torch.randn(tokens, module.d_model, device=p.device, dtype=p.dtype, generator=gen)
    w = [t.requires_grad_(backward) for t in swiglu_weights(module.d_model, module.d_ff, p.device, p.dtype)]
    err = layer_error(module, x, dy if backward else None)
    if backward:
        x.requires_grad_()
        ours = lambda m=module: training_step(m, x, dy)  # noqa: E731
        theirs = lambda fn=swiglu: torch.autograd.grad(fn(x, *w), (x, *w), dy)  # noqa: E731
    else:
        ours = torch.no_grad()(lambda m=module: m(x))  # inference: nothing saved for backward
        theirs = lambda fn=swiglu: fn(x, *w)  # noqa: E731
    compiled = torch.compile(swiglu) if compile_models else None
    ours_ms, theirs_ms = paired_median_ms(ours, theirs)  # eager calls at small T follow the host's speed
    row = LayerRow(
        tokens, backward, ours_ms, theirs_ms,
        median_ms(lambda: theirs(compiled)) if compiled else None, err,
        sum(t.numel() for t in module.parameters()), sum(t.numel() for t in w),
    )
    row.flop = ffn_flop(tokens, row.swiglu_params, backward)
    row.flashmhf_host_ms, row.swiglu_host_ms = host_ms(ours), host_ms(theirs)
    row.flashmhf_graph_ms, row.swiglu_graph_ms = _graph_ms(ours), _graph_ms(theirs)
    compiled_layer = _compiled(module, ours) if compile_models else None
    if compiled_layer is not None:
        row.flashmhf_compiled_ms = median_ms(lambda: ours(compiled_layer))
    if backward:
        row.flashmhf_peak_mib = peak_mib(ours)
        row.swiglu_peak_mib = peak_mib(theirs)
        if compiled:
            row.swiglu_compiled_peak_mib = peak_mib(lambda: theirs(compiled))
        if compiled_layer is not None:
            row.flashmhf_compiled_peak_mib = peak_mib(lambda: ours(compiled_layer))
    return row


def _graph_ms(fn) -> float | None:
    """``fn`` replayed as a CUDA graph (a training step too: autograd's kernels are captured); None,
    with a warning, where it cannot be captured."""
    try:
        return median_ms(fn, graph=True)
    except Exception as exc:  # noqa: BLE001 - reported, the eager measurement stands
        warnings.warn(f"CUDA-graph capture failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return None


def _compiled(module: nn.Module, step) -> nn.Module | None:
    """``torch.compile(module, fullgraph=True)`` after one warm-up ``step``; None, with a warning
    naming the error, where this torch cannot compile it (the eager rows still stand)."""
    compiled = torch.compile(module, fullgraph=True)
    try:
        step(compiled)
    except Exception as exc:  # noqa: BLE001 - reported, and the eager measurements are kept
        warnings.warn(f"torch.compile of the FlashMHF layer failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return None
    return compiled
