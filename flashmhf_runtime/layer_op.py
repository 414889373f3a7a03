"""The layer between its two projections as one op: q (the W_in output) -> s (the W_out input).

``layer_core(q, norm_w, w_r, k, u, v, eps)`` computes the head RMSNorm (when ``norm_w`` is given)
and the router in one generated kernel (kind ``norm_router``, or ``router`` without a norm) and the
core in the core op's kernels, or all three in one kernel (``norm_router_core`` / ``router_core``)
where that measured faster (``_fused_kind``: decode sizes, and mid sizes on small layers). Its
backward recomputes qn and r with the norm/router kernel, runs the core's backward kernels, then one
generated kernel (``norm_router_bwd`` / ``router_bwd``) for the router's and the norm's backward
together with their weight gradients. Only q and the weights are saved for backward: nothing of the
norm or router is kept between the passes.

The same functions back the torch custom ops ``flashmhf::layer_core`` and ``flashmhf::layer_core_bwd``
(what torch.compile sees) and, in eager mode, a ``torch.autograd.Function``: the Python dispatch of a
custom op with autograd costs about three times the host time of a Function call, and at decode and
small training sizes host time is what the layer's speed is made of. Both run the same kernels.

Host path: a call's checks are memoised per signature (shapes, dtypes, devices), and the generated
kernels are launched through ``DirectLauncher`` (precomputed arguments) after their first launch for
a token count; ``prepared_forward`` lets the layer do that host work before it enqueues W_in. Off
CUDA (without ``TRITON_INTERPRET=1``) the same maths runs in plain PyTorch.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from flashmhf.cache.buckets import token_bucket
from flashmhf.codegen import Spec, get_kind
from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import DKUV, DQ, FORWARD, NORM_ROUTER_CORE, ROUTER_CORE
from flashmhf.codegen.spec import kernel_dims
from flashmhf_runtime import dispatch, op
from flashmhf_runtime.direct_launch import DirectLauncher
from flashmhf_runtime.jit_memo import runtime_load
from flashmhf_runtime.lean_autograd import head_rms_norm_backward, head_rms_norm_rstd, router_backward, router_gate
from flashmhf_runtime.reference import HEAD_NORM_EPS, at_least_fp32
from flashmhf_runtime.validation import DTYPE_NAMES, check_layer_inputs, shape_text

# Up to this many tokens the one-kernel forward (norm_router_core / router_core) runs unless the
# tuning cache times the norm/router kind and the core's forward together faster by more than
# DECODE_GPU_MARGIN: an eager call there is mostly host time, and one launch instead of three saves
# ~30 µs of it on the H200 host (2026-12-02: repo-1.3b T = 1 eager 83 -> 55 µs) against a GPU
# difference of a few µs either way. Above, the faster by the cache runs (the two steps where times
# are missing: the core's warp-specialized and TMA kinds serve large T).
FUSED_MAX_TOKENS = 64
DECODE_GPU_MARGIN = 0.10
# Direct launchers of the norm/router kinds by (spec key, token count, device index, eps). Bounded:
# variable sequence lengths make one entry per token count.
_direct: dict[tuple, DirectLauncher | None] = {}
_MAX_DIRECT = 4096
# Signatures whose checks passed: (shape, dtype, device) of q, norm_w, w_r, k, u, v -> dims.
_checked: dict[tuple, tuple[int, int, int, int, int]] = {}
# (signature, eps) -> {token count: (norm/router launcher, core launcher, whether both take addresses
# only)} for the forward's fast path; (None, one-kernel launcher, True) where the one kernel runs.
_fast_forward: dict[tuple, dict[int, tuple]] = {}
# (signature, eps) -> {token count: _BackwardPlan} for the backward's fast path (the q side asked).
_fast_backward: dict[tuple, dict[int, _BackwardPlan]] = {}
dispatch.on_reset(_direct.clear)
dispatch.on_reset(_fast_forward.clear)
dispatch.on_reset(_fast_backward.clear)
dispatch.on_reset(_checked.clear)


def _signature(*tensors) -> tuple:
    return tuple(None if t is None else (t.shape, t.dtype, t.device) for t in tensors)


def _dims(q, norm_w, w_r, k, u, v) -> tuple[int, int, int, int, int]:
    """check_layer_inputs, memoised per signature."""
    sig = _signature(q, norm_w, w_r, k, u, v)
    dims = _checked.get(sig)
    if dims is None:
        dims = check_layer_inputs(q, norm_w, w_r, k, u, v)
        _checked[sig] = dims
    return dims


def _launch(spec_key: tuple, n_tokens: int, device_index: int | None, eps: float, *tensors) -> None:
    """Launch a norm/router kind on contiguous ``tensors`` (its module's SLOTS): the first call for a
    token count through dispatch (config choice, compile, warnings), later ones directly."""
    key = (spec_key, n_tokens, device_index, eps)
    launcher = _direct.get(key)
    if launcher is not None and op.launches_directly(device_index):
        launcher(*tensors)
        return
    dispatch.launch(spec_key, n_tokens, device_index, *tensors, eps)
    config = dispatch.memoised_config(spec_key, n_tokens, device_index)
    if config is not None and launcher is None and op.launches_directly(device_index):
        if len(_direct) >= _MAX_DIRECT:
            _direct.clear()
        module = runtime_load(Spec(*spec_key))
        _direct[key] = DirectLauncher(module, module.contiguous_plan(n_tokens, eps, **config), device_index)


def _fp32(*tensors) -> tuple:
    return tuple(None if t is None else op.widened(t) for t in tensors)


@functools.cache
def _shape_key(dims: tuple, dtype: torch.dtype, arch: Arch, kinds: tuple[str, ...]) -> tuple | None:
    """(H, H_kv, d_h, E, d_e, dtype) of the norm/router ``kinds`` for a layer of ``dims`` on ``arch``,
    or None where one of them cannot take it. They read q with its real d_h (masked to a power of
    two) and do not use d_e, which only has to be a width the code generator accepts. A d_h the
    templates do not take (not a multiple of 8, or over 256), or a kind no config of which fits the
    architecture (its default says so), leaves the norm and router to PyTorch ops around the core's
    kernels (for the backward only, where only the backward's kind does not fit)."""
    n_heads, n_kv, head_dim, n_exp, d_e = dims
    d_h_k, d_e_k = kernel_dims(head_dim, d_e)
    key = (n_heads, n_kv, head_dim, n_exp, d_e_k, DTYPE_NAMES[dtype])
    if d_h_k != head_dim:
        return None
    reasons = [(k, r) for k in kinds if (r := get_kind(k).shape_reason(Spec(k, *key), arch))]
    if reasons:
        kind, reason = reasons[0]
        warnings.warn(f"flashmhf: no {kind} kernel for H={n_heads} d_h={head_dim} E={n_exp} {key[-1]} on {arch.name} "
                      f"({reason}); the head norm and router run as PyTorch ops there (slower)", stacklevel=4)
    return None if reasons else key


def _kinds(norm_w: torch.Tensor | None, backward: bool) -> tuple[str, ...]:
    """The norm/router kinds a pass runs (the backward recomputes with the forward's kind)."""
    forward = "router" if norm_w is None else "norm_router"
    return (forward, f"{forward}_bwd") if backward else (forward,)


@functools.lru_cache(maxsize=4096)
def _fused_kind(head_norm: bool, shape_key: tuple, n_tokens: int, device: torch.device) -> str | None:
    """The one-kernel forward kind to run in place of the norm/router kind and the core's forward
    kind, or None to run those two (see FUSED_MAX_TOKENS). ``shape_key`` is the core's (H, H_kv,
    d_h, E, d_e, dtype), equal to the layer's (no padding)."""
    fused = op.kind_for(NORM_ROUTER_CORE if head_norm else ROUTER_CORE, shape_key, n_tokens, device)
    core = op.kind_for(FORWARD, shape_key, n_tokens, device)
    if fused is None or core is None:
        return fused
    bucket = token_bucket(n_tokens)
    times = [op.tuned_ms(kind, shape_key, bucket, device.index)
             for kind in (fused, "norm_router" if head_norm else "router", core)]
    decode = n_tokens <= FUSED_MAX_TOKENS
    if None in times or op.arch_of(device).is_interpreter:
        return fused if decode else None
    two_steps = times[1] + times[2]
    return fused if times[0] < two_steps * (1 + DECODE_GPU_MARGIN if decode else 1) else None


dispatch.on_reset(_fused_kind.cache_clear)


def _rows(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """x (..., H * d_h) as contiguous (T, H, d_h)."""
    x3 = x.reshape(-1, n_heads, head_dim)
    return x3 if x3.is_contiguous() else x3.contiguous()


def _norm_router_kernel(q3, norm_w, w_r, eps, shape_key) -> tuple[torch.Tensor, torch.Tensor]:
    """(qn, r) for contiguous q3 (T, H, d_h) through the generated kernel; qn is q3 without a norm."""
    n_tokens, n_heads = q3.shape[0], q3.shape[1]
    r = torch.empty((n_tokens, n_heads, w_r.shape[2]), dtype=torch.float32, device=q3.device)
    qn = q3 if norm_w is None else torch.empty_like(q3)
    if n_tokens:
        kind = "router" if norm_w is None else "norm_router"
        _launch((kind, *shape_key), n_tokens, q3.device.index, eps, q3, w_r if norm_w is None else norm_w, w_r,
                qn, r)
    return qn, r


def _norm_router_reference(q4, norm_w, w_r, eps):
    """(qn, r, g, sum g, rstd) in plain PyTorch (fp32 maths); q4 is (..., H, d_h)."""
    rstd = None if norm_w is None else head_rms_norm_rstd(q4, eps)
    qn = q4 if norm_w is None else (at_least_fp32(q4) * rstd * at_least_fp32(norm_w)).to(q4.dtype)
    g, total = router_gate(qn, w_r)
    return qn, g / total, g, total, rstd


def prepared_forward(q_like: torch.Tensor, norm_w: torch.Tensor | None, w_r: torch.Tensor, k: torch.Tensor,
                     u: torch.Tensor, v: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The forward's fast path for a q with ``q_like``'s shape, dtype and device (contiguous): the
    memory it writes is allocated now, and the returned ``run(q)`` only launches and returns s
    (shaped like q). None where the fast path does not serve this call (the first call of a
    signature and token count, non-contiguous weights, tensors off the current device).

    A layer call asks before its W_in product is enqueued and runs after it, so that the GPU does
    not wait between that product and the kernels for this host work (decode sizes)."""
    sig = _signature(q_like, norm_w, w_r, k, u, v)
    launchers = _fast_forward.get((sig, eps))
    if launchers is None or not (k.is_contiguous() and u.is_contiguous() and v.is_contiguous()
                                 and w_r.is_contiguous() and (norm_w is None or norm_w.is_contiguous())
                                 and op.launches_directly(q_like.device.index)):
        return None
    n_heads, _, head_dim, n_exp, _ = _checked[sig]
    n_tokens = q_like.numel() // (n_heads * head_dim)
    plan = launchers.get(n_tokens)
    if plan is None:
        return None
    # No checks (the signature passed them) and no dispatch: direct launches, memory made here.
    prologue, core, direct = plan
    first = w_r if norm_w is None else norm_w
    if prologue is None:  # the norm, router and core in one kernel
        s = torch.empty(q_like.shape, dtype=q_like.dtype, device=q_like.device)

        def run_one(q: torch.Tensor) -> torch.Tensor:
            core(q, first, w_r, k, u, v, s)
            return s

        return run_one
    # Direct launches pass addresses only: q, qn and s keep q's shape (a view is host time).
    shape = q_like.shape if direct else (n_tokens, n_heads, head_dim)
    r = torch.empty((n_tokens, n_heads, n_exp), dtype=torch.float32, device=q_like.device)
    out = torch.empty(shape, dtype=q_like.dtype, device=q_like.device)
    qn = None if norm_w is None else torch.empty_like(out)

    def run_two(q: torch.Tensor) -> torch.Tensor:
        rows = q if direct else q.view(shape)
        prologue(rows, first, w_r, rows if qn is None else qn, r)
        core(rows if qn is None else qn, k, u, v, r, out)
        return out if direct else out.view(q.shape)

    return run_two


def layer_core_forward(q, norm_w, w_r, k, u, v, eps: float = HEAD_NORM_EPS) -> torch.Tensor:
    """s (shaped like q) for q (..., H * d_h): norm, router and core, without autograd."""
    if q.is_contiguous() and (run := prepared_forward(q, norm_w, w_r, k, u, v, eps)) is not None:
        return run(q)
    dims = _dims(q, norm_w, w_r, k, u, v)
    n_heads, head_dim = dims[0], dims[2]
    if not op.uses_kernels(q.device):
        qn, r, *_ = _norm_router_reference(q.unflatten(-1, (n_heads, head_dim)), norm_w, w_r, eps)
        return op.core_forward(qn, k, u, v, r, None).reshape(q.shape)
    if op.widened_in_interpreter(q):  # the interpreter's bf16 is wrong: run fp32, cast back
        return layer_core_forward(*_fp32(q, norm_w, w_r, k, u, v), eps).to(q.dtype)
    shape_key = _shape_key(dims, q.dtype, op.arch_of(q.device), _kinds(norm_w, backward=False))
    if shape_key is None:  # norm and router as PyTorch ops, the core's kernels
        qn, r, *_ = _norm_router_reference(q.unflatten(-1, (n_heads, head_dim)), norm_w, w_r, eps)
        with torch.no_grad():
            return op.flash_mhf(qn, k, u, v, r).reshape(q.shape)
    q3 = _rows(q, n_heads, head_dim)
    fused = _fused_kind_for(q3, norm_w, w_r, k, u, v, shape_key, dims)
    if fused is not None:
        s = torch.empty_like(q3)
        if q3.shape[0]:
            _launch((fused, *shape_key), q3.shape[0], q.device.index, eps, q3, w_r if norm_w is None else norm_w, w_r,
                    k, u, v, s)
    else:
        qn, r = _norm_router_kernel(q3, norm_w, w_r, eps, shape_key)
        with torch.no_grad():  # the core's inference fast path
            s = op.flash_mhf(qn, k, u, v, r)
    _remember_forward(_signature(q, norm_w, w_r, k, u, v), eps, q3, k, u, v, w_r, norm_w, shape_key, dims, fused)
    return s.view(q.shape)


def _fused_kind_for(q3, norm_w, w_r, k, u, v, shape_key, dims) -> str | None:
    """``_fused_kind`` where the one kernel can take these tensors (contiguous weights, K/U/V of the
    kernel's shape: no padding); else None."""
    if op.kernel_shape_key(*dims, shape_key[-1])[:5] != dims or not (
            k.is_contiguous() and u.is_contiguous() and v.is_contiguous() and w_r.is_contiguous()
            and (norm_w is None or norm_w.is_contiguous())):
        return None
    return _fused_kind(norm_w is not None, shape_key, q3.shape[0], q3.device)


def _remember_forward(sig, eps, q3, k, u, v, w_r, norm_w, shape_key, dims, fused: str | None) -> None:
    """After a call through the checked path: keep its launchers for the fast path, where they can
    launch directly (contiguous weights, tensors on the current device, configs chosen, a core that
    needs no padding): the one-kernel forward's (``fused``), else the norm/router's and the core's."""
    core_shape = op.kernel_shape_key(*dims, shape_key[-1])
    if not (op.uses_kernels(q3.device) and op.launches_directly(q3.device.index)) or core_shape[:5] != dims:
        return
    n_tokens = q3.shape[0]
    if fused is not None:
        prologue, core = None, _direct.get(((fused, *shape_key), n_tokens, q3.device.index, eps))
    else:
        kind = "router" if norm_w is None else "norm_router"
        prologue = _direct.get(((kind, *shape_key), n_tokens, q3.device.index, eps))
        core_kind = op.kind_for(FORWARD, core_shape, n_tokens, q3.device)
        core = None if core_kind is None else op.fast_launcher((core_kind, *core_shape), n_tokens, q3.device.index)
    if core is not None and (prologue is not None or fused is not None):
        if len(_fast_forward) >= _MAX_DIRECT:
            _fast_forward.clear()
        per_tokens = _fast_forward.setdefault((sig, eps), {})
        if len(per_tokens) >= _MAX_DIRECT:  # variable sequence lengths: keep the memo bounded
            per_tokens.clear()
        per_tokens[n_tokens] = (prologue, core, fused is not None or isinstance(core, DirectLauncher))


class _BackwardPlan(NamedTuple):
    """The launchers of one backward at one token count, each of a config already chosen."""

    dims: tuple[int, int, int, int, int]
    prologue: DirectLauncher  # norm/router recomputation: (q3, norm_w or w_r, w_r, qn, r)
    dq: Callable  # core dq/dr: (qn, k, u, v, r, ds3, dqn, dr)
    dkuv: Callable | None  # core dK/dU/dV: (qn, k, u, v, r, ds3, dk, du, dv); None if never launched
    epilogue: DirectLauncher  # norm/router backward: (q3, norm_w or w_r, w_r, dqn, dr, dq, dw_r, dnorm_w or dw_r)


def _fast_backward_call(plan: _BackwardPlan, q, norm_w, w_r, k, u, v, ds,
                        need_dkuv: bool) -> tuple[torch.Tensor, ...]:
    """layer_core_backward of contiguous tensors whose signature passed the checks before, with the
    q side asked for: the same kernels and allocations, without the checks, config lookups and
    padding steps. Without ``need_dkuv`` (K, U and V frozen, as in fine-tuning that trains other
    weights) dk, du and dv are distinct empty tensors, as on the checked path."""
    n_heads, _, head_dim, n_exp, _ = plan.dims
    n_tokens = q.numel() // (n_heads * head_dim)
    q3, ds3 = q.view(n_tokens, n_heads, head_dim), ds.view(n_tokens, n_heads, head_dim)
    first = w_r if norm_w is None else norm_w
    r = torch.empty((n_tokens, n_heads, n_exp), dtype=torch.float32, device=q.device)
    qn = q3 if norm_w is None else torch.empty_like(q3)
    plan.prologue(q3, first, w_r, qn, r)
    dqn, dr = torch.empty_like(q3), torch.empty_like(r)
    if need_dkuv:
        dk, du, dv = torch.empty_like(k), torch.empty_like(u), torch.empty_like(v)
    else:
        dk, du, dv = (torch.empty(0, dtype=q.dtype, device=q.device) for _ in range(3))
    dq, dw_r = torch.empty_like(q3), torch.empty_like(w_r)
    dnorm_w = torch.empty(0, dtype=q.dtype, device=q.device) if norm_w is None else torch.empty_like(norm_w)

    def dq_side() -> None:
        plan.dq(qn, k, u, v, r, ds3, dqn, dr)
        plan.epilogue(q3, first, w_r, dqn, dr, dq, dw_r, dw_r if norm_w is None else dnorm_w)

    if not need_dkuv:
        dq_side()
    elif op.BACKWARD_ON_TWO_STREAMS and q.is_cuda:
        op.launch_side_by_side(lambda: plan.dkuv(qn, k, u, v, r, ds3, dk, du, dv), dq_side, q.device)
    else:
        plan.dkuv(qn, k, u, v, r, ds3, dk, du, dv)
        dq_side()
    return dq.view(q.shape), dnorm_w, dw_r, dk, du, dv


def _remember_backward(sig, eps, q3, norm_w, shape_key, dims) -> None:
    """After a checked backward that asked for the q side: keep its launchers for the fast path,
    where they can launch without checks (tensors on the current device, a core that needs no
    padding, contiguous weights, configs chosen); the dK/dU/dV launcher once a backward has
    launched it."""
    core_shape = op.kernel_shape_key(*dims, shape_key[-1])
    if not (op.uses_kernels(q3.device) and op.launches_directly(q3.device.index)) or core_shape[:5] != dims:
        return
    n_tokens, device = q3.shape[0], q3.device
    forward, backward = _kinds(norm_w, backward=True)
    prologue = _direct.get(((forward, *shape_key), n_tokens, device.index, eps))
    epilogue = _direct.get(((backward, *shape_key), n_tokens, device.index, eps))
    kind_dq, kind_dkuv = (op.kind_for(role, core_shape, n_tokens, device) for role in (DQ, DKUV))
    if prologue is None or epilogue is None or kind_dq is None:
        return
    dq = dispatch.bound_launcher((kind_dq, *core_shape), n_tokens, device.index)
    dkuv = None if kind_dkuv is None else dispatch.bound_launcher((kind_dkuv, *core_shape), n_tokens, device.index)
    if dq is None:
        return
    if len(_fast_backward) >= _MAX_DIRECT:
        _fast_backward.clear()
    per_tokens = _fast_backward.setdefault((sig, eps), {})
    if len(per_tokens) >= _MAX_DIRECT:
        per_tokens.clear()
    per_tokens[n_tokens] = _BackwardPlan(dims, prologue, dq, dkuv, epilogue)


def layer_core_backward(q, norm_w, w_r, k, u, v, ds, eps: float = HEAD_NORM_EPS, need_q_side: bool = True,
                        need_dkuv: bool = True,
                        then: Callable[[torch.Tensor | None], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dnorm_w, dw_r, dk, du, dv) for the output gradient ``ds`` (shaped like q).

    ``need_q_side`` covers dq, dnorm_w and dw_r, ``need_dkuv`` dk, du and dv; a gradient not asked
    for, and dnorm_w without a norm, comes back as an empty tensor. ``then(dq)`` (dq None when not
    asked for), if given, is called as soon as dq is enqueued, before the core's dK/dU/dV kernel is
    waited for: work enqueued there overlaps that kernel (at the cost of memory held meanwhile)."""
    sig = _signature(q, norm_w, w_r, k, u, v)
    if need_q_side and then is None:
        plans = _fast_backward.get((sig, eps))
        if plans is not None and ds.shape == q.shape and ds.dtype == q.dtype and ds.device == q.device and \
                q.is_contiguous() and ds.is_contiguous() and k.is_contiguous() and u.is_contiguous() and \
                v.is_contiguous() and w_r.is_contiguous() and (norm_w is None or norm_w.is_contiguous()) and \
                op.launches_directly(q.device.index):
            dims = _checked[sig]
            plan = plans.get(q.numel() // (dims[0] * dims[2]))
            if plan is not None and (plan.dkuv is not None or not need_dkuv):
                return _fast_backward_call(plan, q, norm_w, w_r, k, u, v, ds, need_dkuv)
    dims = _dims(q, norm_w, w_r, k, u, v)
    n_heads, head_dim = dims[0], dims[2]
    if ds.shape != q.shape or ds.dtype != q.dtype or ds.device != q.device:
        raise ValueError(f"ds: expected shape {shape_text(q)}, dtype {q.dtype}, device {q.device} (q's), got "
                         f"{shape_text(ds)}, {ds.dtype}, {ds.device}")
    remember = need_q_side and then is None
    then = then or (lambda _dq: None)
    empty = functools.partial(torch.empty, 0, device=q.device)
    if not op.uses_kernels(q.device):
        return _then(then, need_q_side, _reference_backward(q, norm_w, w_r, k, u, v, ds, eps, need_q_side, need_dkuv,
                                                            dims))
    if op.widened_in_interpreter(q):  # the interpreter's bf16 is wrong: run fp32, cast back
        grads = layer_core_backward(*_fp32(q, norm_w, w_r, k, u, v, ds), eps, need_q_side, need_dkuv)
        return _then(then, need_q_side, tuple(g.to(q.dtype) for g in grads))
    shape_key = _shape_key(dims, q.dtype, op.arch_of(q.device), _kinds(norm_w, backward=True))
    if shape_key is None:  # norm and router as PyTorch ops, the core's kernels
        return _then(then, need_q_side, _reference_backward(q, norm_w, w_r, k, u, v, ds, eps, need_q_side, need_dkuv,
                                                            dims))
    q3, ds3 = _rows(q, n_heads, head_dim), _rows(ds, n_heads, head_dim)
    qn, r = _norm_router_kernel(q3, norm_w, w_r, eps, shape_key)
    if need_q_side:  # placeholders (distinct: custom-op outputs) only for what is not computed
        dq, dw_r = torch.empty_like(q3), torch.empty_like(w_r)
        dnorm_w = empty(dtype=q.dtype) if norm_w is None else torch.empty_like(norm_w)
    else:
        dq, dnorm_w, dw_r = empty(dtype=q.dtype), empty(dtype=q.dtype), empty(dtype=w_r.dtype)

    def norm_router_backward(dqn: torch.Tensor, dr: torch.Tensor) -> None:
        if need_q_side:
            kind = _kinds(norm_w, backward=True)[1]
            _launch((kind, *shape_key), q3.shape[0], q.device.index, eps, q3, w_r if norm_w is None else norm_w, w_r,
                    dqn, dr, dq, dw_r, dw_r if norm_w is None else dnorm_w)
        then(dq.view(q.shape) if need_q_side else None)

    _dqn, dk, du, dv, _dr = op.core_backward(qn, k, u, v, r, ds3, need_q_side, need_dkuv, then=norm_router_backward)
    if remember and q.is_contiguous() and ds.is_contiguous():
        _remember_backward(sig, eps, q3, norm_w, shape_key, dims)
    return (dq.view(q.shape) if need_q_side else dq), dnorm_w, dw_r, dk, du, dv


def _then(then: Callable[[torch.Tensor | None], None], need_q_side: bool, grads: tuple) -> tuple:
    then(grads[0] if need_q_side else None)
    return grads


def _reference_backward(q, norm_w, w_r, k, u, v, ds, eps, need_q_side, need_dkuv, dims):
    """layer_core_backward with the norm and router in PyTorch ops (fp32) around the core op's
    backward (its kernels, or its reference off the GPU)."""
    n_heads, head_dim = dims[0], dims[2]
    q4, ds4 = q.unflatten(-1, (n_heads, head_dim)), ds.unflatten(-1, (n_heads, head_dim))
    qn, r, g, total, rstd = _norm_router_reference(q4, norm_w, w_r, eps)
    dqn, dk, du, dv, dr = op.core_backward(qn, k, u, v, r, ds4, need_q_side, need_dkuv)
    empty = functools.partial(torch.empty, 0, device=q.device)
    dq, dnorm_w, dw_r = empty(dtype=q.dtype), empty(dtype=q.dtype), empty(dtype=w_r.dtype)
    if need_q_side:
        dqn_router, dw_r = router_backward(at_least_fp32(qn), w_r, g, total, dr)  # fp32 dq part
        dqn_total = dqn_router + dqn
        if norm_w is None:
            dq = dqn_total.to(q.dtype).reshape(q.shape)
        else:
            dq4, dnorm_w = head_rms_norm_backward(q4, norm_w, rstd, dqn_total)
            dq = dq4.reshape(q.shape).contiguous()
    return dq, dnorm_w, dw_r, dk, du, dv


@torch.library.custom_op("flashmhf::layer_core", mutates_args=())
def layer_core_op(q: torch.Tensor, norm_w: torch.Tensor | None, w_r: torch.Tensor, k: torch.Tensor,
                  u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    return layer_core_forward(q, norm_w, w_r, k, u, v, eps)


@layer_core_op.register_fake
def _layer_core_fake(q, norm_w, w_r, k, u, v, eps):
    check_layer_inputs(q, norm_w, w_r, k, u, v)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("flashmhf::layer_core_bwd", mutates_args=())
def layer_core_bwd_op(
    q: torch.Tensor, norm_w: torch.Tensor | None, w_r: torch.Tensor, k: torch.Tensor, u: torch.Tensor,
    v: torch.Tensor, ds: torch.Tensor, eps: float, need_q_side: bool, need_dkuv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_core_backward(q, norm_w, w_r, k, u, v, ds, eps, need_q_side, need_dkuv)


@layer_core_bwd_op.register_fake
def _layer_core_bwd_fake(q, norm_w, w_r, k, u, v, ds, eps, need_q_side, need_dkuv):
    check_layer_inputs(q, norm_w, w_r, k, u, v)

    def grad(like: torch.Tensor | None, wanted: bool) -> torch.Tensor:
        if like is None or not wanted:
            return torch.empty(0, dtype=q.dtype if like is None else like.dtype, device=q.device)
        return torch.empty(like.shape, dtype=like.dtype, device=q.device)

    return (grad(q, need_q_side), grad(norm_w, need_q_side), grad(w_r, need_q_side), grad(k, need_dkuv),
            grad(u, need_dkuv), grad(v, need_dkuv))


def _needs(needs_input_grad) -> tuple[bool, bool]:
    need_q, need_norm, need_w_r, need_k, need_u, need_v = needs_input_grad[:6]
    return need_q or need_norm or need_w_r, need_k or need_u or need_v


def _grads(needs_input_grad, grads) -> tuple:
    """The gradients autograd asked for (None for the rest and for eps)."""
    return (*(g if need else None for g, need in zip(grads, needs_input_grad[:6])), None)


def _setup_context(ctx, inputs, output) -> None:
    q, norm_w, w_r, k, u, v, eps = inputs
    ctx.save_for_backward(q, norm_w, w_r, k, u, v)  # no activation of the norm, router or core
    ctx.eps = eps


def _backward(ctx, ds):
    need_q_side, need_dkuv = _needs(ctx.needs_input_grad)
    grads = layer_core_bwd_op(*ctx.saved_tensors, ds, ctx.eps, need_q_side, need_dkuv)
    return _grads(ctx.needs_input_grad, grads)


layer_core_op.register_autograd(_backward, setup_context=_setup_context)


class _LayerCore(torch.autograd.Function):
    """The eager twin of ``flashmhf::layer_core`` with the same forward and backward functions."""

    @staticmethod
    def forward(ctx, q, norm_w, w_r, k, u, v, eps):
        ctx.save_for_backward(q, norm_w, w_r, k, u, v)
        ctx.eps = eps
        return layer_core_forward(q, norm_w, w_r, k, u, v, eps)

    @staticmethod
    def backward(ctx, ds):
        need_q_side, need_dkuv = _needs(ctx.needs_input_grad)
        grads = layer_core_backward(*ctx.saved_tensors, ds.contiguous(), ctx.eps, need_q_side, need_dkuv)
        return _grads(ctx.needs_input_grad, grads)


def layer_core(q: torch.Tensor, norm_w: torch.Tensor | None, w_r: torch.Tensor, k: torch.Tensor, u: torch.Tensor,
               v: torch.Tensor, eps: float = HEAD_NORM_EPS) -> torch.Tensor:
    """The FlashMHF layer between its projections: s = core(qn, K, U, V, router(qn)), qn = norm(q).

    q: (..., H * d_h), the W_in output; norm_w: (H, d_h) or None (no head norm); w_r: (H, d_h, E);
    k, u, v: (H_kv, E, d_e, d_h); all of q's dtype and device. Returns s shaped like q (the W_out
    input). Differentiable in every tensor argument."""
    if type(q) is not torch.Tensor and op.is_dtensor(q):  # tensor parallel over heads
        from flashmhf_runtime.parallel import layer_core_on_local_shards

        return layer_core_on_local_shards(q, norm_w, w_r, k, u, v, eps)
    if torch.compiler.is_compiling():
        return layer_core_op(q, norm_w, w_r, k, u, v, eps)
    try:
        wants_grad = torch.is_grad_enabled() and (
            q.requires_grad or w_r.requires_grad or k.requires_grad or u.requires_grad or v.requires_grad
            or (norm_w is not None and norm_w.requires_grad))
    except AttributeError:  # an argument is not a tensor: the checks name it
        check_layer_inputs(q, norm_w, w_r, k, u, v)
        raise
    if wants_grad:
        return _LayerCore.apply(q, norm_w, w_r, k, u, v, eps)
    return layer_core_forward(q, norm_w, w_r, k, u, v, eps)
