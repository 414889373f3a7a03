"""The core op ``flash_mhf``: generated Triton kernels on CUDA (and under TRITON_INTERPRET=1 on CPU),
the plain-PyTorch reference elsewhere. Registered as the torch custom op ``flashmhf::core`` so that
torch.compile and CUDA graphs see one opaque node.

Inference fast path (``flash_mhf`` without grad, default config, contiguous inputs): after the first
validated call with a given signature (shapes, dtypes, devices), a call skips validation and the
torch dispatcher; after the first launch for a token count it also skips Triton's JIT dispatch, and
launches the compiled kernels with precomputed arguments (flashmhf_runtime/direct_launch.py). Calls
with a misaligned pointer, or with a Triton launch hook (profiler) set, take Triton's JIT path.

Kinds: for each role (forward; dq, dr; dK, dU, dV) the kind registry (flashmhf.codegen.registry)
chooses what runs on the device's architecture at the token count (``kind_for``): on Hopper GPUs,
for shapes they take, the warp-specialized Gluon kernels run the forward and dq, dr from 1024 tokens
(``fwd_ws``, ``bwd_dq_ws``) and dK, dU, dV always (``bwd_dkuv_ws``); the Triton kernels ``fwd``,
``bwd_dq``, ``bwd_dkuv`` run everything else. Layers whose d_h or d_e the templates do not take run
on the kernels of the next larger widths, on zero-padded copies (flashmhf_runtime/padding.py); a
shape no kernel takes (d_h > 256) runs on the reference, with one warning.

Autograd: ``flashmhf::core`` saves only its inputs q, k, u, v, r (never anything of size T x d_ff);
its backward is the custom op ``flashmhf::core_bwd``, which launches the dq/dr and dK/dU/dV kernels.
In eager mode a ``torch.autograd.Function`` with the same forward and backward functions stands in
for the custom op (less host time per call); torch.compile sees the custom ops.
It allocates nothing but the gradients, with sizes known from the input shapes alone (no host
sync), so it can be captured in a CUDA graph."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable

import torch

from flashmhf.cache import lookup
from flashmhf.cache.buckets import token_bucket
from flashmhf.cache.device import device_arch, device_info, interpreting
from flashmhf.codegen import Config, Spec, registry
from flashmhf.codegen.arch import INTERPRETER, Arch
from flashmhf.codegen.kinds import CORE_ROLES, DKUV, DQ, FORWARD, Role
from flashmhf.codegen.spec import kernel_dims
from flashmhf_runtime import dispatch, padding, reference, scratch
from flashmhf_runtime.direct_launch import DirectLauncher
from flashmhf_runtime.jit_memo import runtime_load
from flashmhf_runtime.validation import DTYPE_NAMES, check_core_inputs, check_grad_output

_INTERPRET = interpreting()

# Triton 3.6's CPU interpreter multiplies bf16 operands as raw bit patterns (results ~1e11 off), so
# under the interpreter bf16 inputs run through the fp32 kernels and the results are cast back to
# bf16: right answers, never silently wrong ones. A test suite that makes the interpreter's bf16
# exact (tests/interpreter_bf16_shim.py) sets this True to run the bf16 kernels themselves.
INTERPRETER_RUNS_BF16 = False


def uses_kernels(device: torch.device) -> bool:
    """Generated kernels run on CUDA, and on CPU only under Triton's interpreter."""
    return device.type == "cuda" or (_INTERPRET and device.type == "cpu")


def widened_in_interpreter(q: torch.Tensor) -> bool:
    """Whether this call runs its bf16 inputs as fp32 (see INTERPRETER_RUNS_BF16)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and _INTERPRET and not INTERPRETER_RUNS_BF16


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` as fp32 if it is bf16 (what the interpreter computes in; see INTERPRETER_RUNS_BF16), else ``t``."""
    return t.float() if t.dtype == torch.bfloat16 else t


def _reference_forward(q, k, u, v, r) -> torch.Tensor:
    # 16-bit math on CPU is slow and inexact: compute in fp32 (or better) and cast back.
    wide = torch.promote_types(q.dtype, torch.float32)
    s = reference.flash_mhf(q.to(wide), k.to(wide), u.to(wide), v.to(wide), r.to(wide))
    return s.to(q.dtype).contiguous()  # contiguous like the kernels' output and the fake's


def as_rows(t: torch.Tensor, last_two: tuple[int, int]) -> torch.Tensor:
    """View ``t`` as (T, *last_two) with unit stride in the last dim, copying only if it must."""
    t3 = t.reshape(-1, *last_two)
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def core_forward(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, config: Config | None
) -> torch.Tensor:
    """Validated forward without autograd: s shaped like q."""
    n_heads, n_kv, head_dim, n_exp, d_e = check_core_inputs(q, k, u, v, r)
    if not uses_kernels(q.device):
        return _reference_forward(q, k, u, v, r)
    if widened_in_interpreter(q):
        return core_forward(*map(widened, (q, k, u, v, r)), config).to(q.dtype)
    shape_key = kernel_shape_key(n_heads, n_kv, head_dim, n_exp, d_e, DTYPE_NAMES[q.dtype])
    _, _, d_h_k, _, d_e_k, _ = shape_key
    n_tokens = q.numel() // (n_heads * head_dim)
    kind = "fwd" if config is not None else kind_for(FORWARD, shape_key, n_tokens, q.device)  # pinned: fwd's
    if kind is None:
        _warn_reference(FORWARD, shape_key, q.device)
        return _reference_forward(q, k, u, v, r)
    q3 = as_rows(padding.pad_last(q, d_h_k), (n_heads, d_h_k))
    r3 = as_rows(r, (n_heads, n_exp))
    k, u, v = (padding.pad_weight(w if w.is_contiguous() else w.contiguous(), d_e_k, d_h_k) for w in (k, u, v))
    out = torch.empty((n_tokens, n_heads, d_h_k), dtype=q.dtype, device=q.device)
    if n_tokens:
        if config is None:
            dispatch.launch((kind, *shape_key), n_tokens, q.device.index, q3, k, u, v, r3, out)
        else:
            dispatch.launch_with_config((kind, *shape_key), config, q3, k, u, v, r3, out, arch=arch_of(q.device))
    return padding.cut_last(out, head_dim).view(q.shape)


def _reference_backward(q, k, u, v, r, ds) -> tuple[torch.Tensor, ...]:
    """The written-out reference backward in fp32 (16-bit math on CPU is slow and inexact)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    return reference.flash_mhf_backward(*(t.to(wide) for t in (q, k, u, v, r, ds)))


def _reference_grads(q, k, u, v, r, ds, need_dq_dr: bool, need_dkuv: bool) -> tuple[torch.Tensor, ...]:
    """core_backward's results from the reference backward."""
    grads = _reference_backward(q, k, u, v, r, ds)
    wanted = (need_dq_dr, need_dkuv, need_dkuv, need_dkuv, need_dq_dr)
    dtypes = (q.dtype, q.dtype, q.dtype, q.dtype, r.dtype)
    return tuple(g.to(dt).contiguous() if w else torch.empty(0, dtype=dt, device=q.device)
                 for g, w, dt in zip(grads, wanted, dtypes))


# bwd_dkuv runs few, long programs (one d_ff tile each, looping over every token): its last wave
# leaves most SMs idle. On CUDA it therefore runs on a high-priority side stream next to bwd_dq,
# whose many short programs fill those SMs. Set False to run the two kernels one after the other.
BACKWARD_ON_TWO_STREAMS = True


# Kinds the op never runs (e.g. {"fwd_ws", "bwd_dq_ws", "bwd_dkuv_ws"} to time the plain Triton
# kernels on a Hopper GPU); the registry chooses among the others. kind_for reads it on every call,
# but the fast paths keep the launchers they were given: call flashmhf_runtime.reset() after a change.
DISABLED_KINDS: set[str] = set()


def kernel_shape_key(n_heads: int, n_kv: int, head_dim: int, n_exp: int, d_e: int, dtype: str) -> tuple:
    """(H, H_kv, d_h, E, d_e, dtype) of the kernels that run a layer of this shape: d_h and d_e
    rounded up to widths the templates take (flashmhf_runtime/padding.py pads the tensors)."""
    d_h_k, d_e_k = kernel_dims(head_dim, d_e)
    return n_heads, n_kv, d_h_k, n_exp, d_e_k, dtype


def arch_of(device: torch.device) -> Arch:
    """The architecture the kernels for ``device`` are chosen and configured for."""
    return device_arch(device.index) if device.type == "cuda" else INTERPRETER


def kind_for(role: Role, shape_key: tuple, n_tokens: int, device: torch.device) -> str | None:
    """The kind that runs ``role`` for the kernel shape ``shape_key`` = (H, H_kv, d_h, E, d_e, dtype)
    at ``n_tokens`` on ``device``; None: none can (the reference runs). Of the kinds the registry
    finds able (flashmhf.codegen.registry.candidates), the one the tuning cache measured fastest on
    this device near this token count; by the registry's preference where times are missing."""
    return _kind(role, shape_key, n_tokens, device, frozenset(DISABLED_KINDS))


# Memoised: the choice depends only on these arguments and the cache files (re-read after reset()),
# and a training step asks three times (~9 µs each on a CPU when worked out). One entry per token
# count: bounded for variable sequence lengths.
@functools.lru_cache(maxsize=4096)
def _kind(role: Role, shape_key: tuple, n_tokens: int, device: torch.device, disabled: frozenset) -> str | None:
    arch = arch_of(device)
    able = registry.candidates(role, Spec("", *shape_key), max(n_tokens, 1), arch, disabled)
    if len(able) < 2 or arch.is_interpreter:
        return able[0] if able else None
    return _fastest_tuned(able, shape_key, token_bucket(n_tokens), device.index)


def _fastest_tuned(able: tuple[str, ...], shape_key: tuple, bucket: int, device_index: int | None) -> str:
    """Of ``able`` (in order of preference), the kind with the lowest tuned time: each challenger is
    compared with the best so far at the tuned bucket both share nearest to ``bucket`` (log2 distance,
    ties to the larger); a kind without shared times never displaces the one before it. E.g. on the
    H200, repo-128m at T = 1024 runs ``fwd`` (0.044 ms) rather than ``fwd_ws`` (0.128 ms)."""
    info = device_info(device_index)
    times = {kind: lookup.tuned_times(Spec(kind, *shape_key), info) for kind in able}
    best = able[0]
    for kind in able[1:]:
        shared = set(times[best]) & set(times[kind])
        if not shared:
            continue
        near = min(shared, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), -b))
        if times[kind][near] < times[best][near]:
            best = kind
    return best


dispatch.on_reset(_kind.cache_clear)


def tuned_ms(kind: str, shape_key: tuple, bucket: int, device_index: int | None) -> float | None:
    """The tuning cache's time (ms) of ``kind``'s best config for ``shape_key`` at token bucket
    ``bucket`` on this device; None when that bucket is not tuned."""
    return lookup.tuned_times(Spec(kind, *shape_key), device_info(device_index)).get(bucket)


def kernel_kinds(spec_key: tuple, n_tokens: int, device: torch.device) -> dict[str, str | None]:
    """The kinds the op runs for ``spec_key`` = (H, H_kv, d_h, E, d_e, dtype) at ``n_tokens`` on
    ``device``, by role name: {"forward": …, "dq": …, "dkuv": …}."""
    shape_key = kernel_shape_key(*spec_key)
    return {role.name: kind_for(role, shape_key, n_tokens, device) for role in CORE_ROLES}


_reference_warned: set[tuple] = set()


def _warn_reference(role: Role, shape_key: tuple, device: torch.device) -> None:
    """Once per shape and architecture: no kernel takes the shape, the reference runs."""
    arch = arch_of(device)
    if (shape_key, arch) in _reference_warned:
        return
    _reference_warned.add((shape_key, arch))
    reason = registry.reason(role, Spec("", *shape_key), arch)
    warnings.warn(f"flashmhf: no kernel takes H={shape_key[0]} H_kv={shape_key[1]} d_h={shape_key[2]} E={shape_key[3]} "
                  f"d_e={shape_key[4]} {shape_key[5]} on {arch.name} ({reason}); the core runs on the PyTorch "
                  "reference instead (slow)", stacklevel=4)


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index, priority=-1)


def launch_side_by_side(first: Callable[[], None], second: Callable[[], None], device: torch.device) -> None:
    """Launch ``first`` on the device's side stream and ``second`` on the current stream, concurrently;
    the current stream then waits for both (this fork/join also works under CUDA-graph capture).
    Every tensor involved was allocated on the current stream before the fork and is only freed
    after the join, so the side stream needs no record_stream.

    Streams and events are passed explicitly: ``torch.cuda.stream()`` and ``Stream.wait_stream``
    look the current device and stream up again at each step, ~100 µs of host time per fork/join on
    a GPU host, where a training step at T = 1024 has ~750 µs of GPU work."""
    index = torch.cuda.current_device()
    if device.index is not None and device.index != index:  # set_stream would switch the current device
        with torch.cuda.device(device.index):
            launch_side_by_side(first, second, torch.device("cuda", device.index))
        return
    main, side = torch.cuda.current_stream(index), _side_stream(index)
    fork, join = torch.cuda.Event(), torch.cuda.Event()
    fork.record(main)
    side.wait_event(fork)
    torch.cuda.set_stream(side)
    try:
        first()
    finally:
        torch.cuda.set_stream(main)
    second()
    join.record(side)
    main.wait_event(join)


def core_backward(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, ds: torch.Tensor,
    need_dq_dr: bool = True, need_dkuv: bool = True,
    then: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, du, dv, dr) of the core for the output gradient ``ds`` (shaped like q).

    dq, dk, du, dv come in q's dtype and dr in r's. A gradient that is not asked for (``need_dq_dr``
    covers dq and dr, ``need_dkuv`` dk, du and dv) comes back as an empty tensor, so its kernel is
    skipped. ``then(dq, dr)``, if given, is called once dq and dr are enqueued (while the dK/dU/dV
    kernel may still run on the side stream): work it enqueues on the current stream overlaps it."""
    n_heads, n_kv, head_dim, n_exp, d_e = check_core_inputs(q, k, u, v, r)
    check_grad_output(q, ds)
    then = then or (lambda _dq, _dr: None)
    if not uses_kernels(q.device):
        grads = _reference_grads(q, k, u, v, r, ds, need_dq_dr, need_dkuv)
        then(grads[0], grads[4])
        return grads
    if widened_in_interpreter(q):
        grads = core_backward(*map(widened, (q, k, u, v, r, ds)), need_dq_dr, need_dkuv)
        grads = tuple(g.to(dt) for g, dt in zip(grads, (q.dtype,) * 4 + (r.dtype,)))
        then(grads[0], grads[4])
        return grads  # type: ignore[return-value]
    n_tokens = q.numel() // (n_heads * head_dim)
    shape_key = kernel_shape_key(n_heads, n_kv, head_dim, n_exp, d_e, DTYPE_NAMES[q.dtype])
    _, _, d_h_k, _, d_e_k, _ = shape_key
    kind_dq, kind_dkuv = (kind_for(role, shape_key, n_tokens, q.device) for role in (DQ, DKUV))
    if (need_dq_dr and kind_dq is None) or (need_dkuv and kind_dkuv is None):
        _warn_reference(DQ if kind_dq is None else DKUV, shape_key, q.device)
        grads = _reference_grads(q, k, u, v, r, ds, need_dq_dr, need_dkuv)
        then(grads[0], grads[4])
        return grads
    q3 = as_rows(padding.pad_last(q, d_h_k), (n_heads, d_h_k))
    r3 = as_rows(r, (n_heads, n_exp))
    ds3 = as_rows(padding.pad_last(ds, d_h_k), (n_heads, d_h_k))
    k, u, v = (padding.pad_weight(w if w.is_contiguous() else w.contiguous(), d_e_k, d_h_k) for w in (k, u, v))
    # Gradients not asked for are distinct empty tensors (a custom op's outputs may not alias), made
    # only then: each allocation is host time.
    if need_dq_dr:
        dq = torch.empty((n_tokens, n_heads, d_h_k), dtype=q.dtype, device=q.device)
        dr = torch.empty((n_tokens, n_heads, n_exp), dtype=r.dtype, device=q.device)
    else:
        dq, dr = torch.empty(0, dtype=q.dtype, device=q.device), torch.empty(0, dtype=r.dtype, device=q.device)
    dq_out, dr_out = dq, dr
    if need_dkuv:
        make = torch.empty_like if n_tokens else torch.zeros_like
        dk, du, dv = (make(k, memory_format=torch.contiguous_format) for _ in range(3))
    else:
        dk, du, dv = (torch.empty(0, dtype=q.dtype, device=q.device) for _ in range(3))

    def launch_dq() -> None:
        nonlocal dq_out, dr_out
        if need_dq_dr:
            if n_tokens:
                dispatch.launch((kind_dq, *shape_key), n_tokens, q.device.index, q3, k, u, v, r3, ds3, dq, dr)
            dq_out, dr_out = padding.cut_last(dq, head_dim).view(q.shape), dr.view(r.shape)  # cut_last copies
        then(dq_out, dr_out)

    def launch_dkuv() -> None:
        if n_tokens and need_dkuv:
            dispatch.launch((kind_dkuv, *shape_key), n_tokens, q.device.index, q3, k, u, v, r3, ds3, dk, du, dv)

    if n_tokens and need_dq_dr and need_dkuv and q.is_cuda and BACKWARD_ON_TWO_STREAMS:
        launch_side_by_side(launch_dkuv, launch_dq, q.device)
    else:
        launch_dkuv()
        launch_dq()
    if need_dkuv:
        dk, du, dv = (padding.cut_weight(g, d_e, head_dim) for g in (dk, du, dv))
    return dq_out, dk, du, dv, dr_out


def config_to_str(config: Config | None) -> str:
    return "" if not config else ",".join(f"{k}={int(v)}" for k, v in sorted(config.items()))


@functools.lru_cache(maxsize=256)
def config_from_str(text: str) -> Config | None:
    if not text:
        return None
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


@torch.library.custom_op("flashmhf::core", mutates_args=())
def core_op(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, config: str
) -> torch.Tensor:
    return core_forward(q, k, u, v, r, config_from_str(config))


@core_op.register_fake
def _core_op_fake(q, k, u, v, r, config):
    check_core_inputs(q, k, u, v, r)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _grad_shapes(q, k, r, need_dq_dr: bool, need_dkuv: bool):
    """Shapes and dtypes of core_bwd's outputs (empty for a gradient not asked for)."""
    return (
        (q.shape if need_dq_dr else (0,), q.dtype),
        *(((k.shape if need_dkuv else (0,)), q.dtype) for _ in range(3)),
        (r.shape if need_dq_dr else (0,), r.dtype),
    )


@torch.library.custom_op("flashmhf::core_bwd", mutates_args=())
def core_bwd_op(
    q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, ds: torch.Tensor,
    need_dq_dr: bool, need_dkuv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return core_backward(q, k, u, v, r, ds, need_dq_dr, need_dkuv)


@core_bwd_op.register_fake
def _core_bwd_op_fake(q, k, u, v, r, ds, need_dq_dr, need_dkuv):
    check_core_inputs(q, k, u, v, r)
    check_grad_output(q, ds)
    shapes = _grad_shapes(q, k, r, need_dq_dr, need_dkuv)
    return tuple(torch.empty(shape, dtype=dtype, device=q.device) for shape, dtype in shapes)


def _setup_context(ctx, inputs, output) -> None:
    q, k, u, v, r, _config = inputs
    ctx.save_for_backward(q, k, u, v, r)  # only the inputs: backward recomputes q K^T and q U^T


def _gradients(ctx, ds, run) -> tuple:
    """The gradients autograd asked for (None for the rest and for the config), computed by ``run``:
    the custom op ``core_bwd_op`` (traced) or ``core_backward`` (eager)."""
    needs = ctx.needs_input_grad[:5]  # q, k, u, v, r
    need_dq_dr, need_dkuv = needs[0] or needs[4], any(needs[1:4])
    if not (need_dq_dr or need_dkuv):
        return (None,) * 6
    grads = run(*ctx.saved_tensors, ds, need_dq_dr, need_dkuv)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


def _backward(ctx, ds):
    return _gradients(ctx, ds, core_bwd_op)


core_op.register_autograd(_backward, setup_context=_setup_context)


class _Core(torch.autograd.Function):
    """The eager twin of ``flashmhf::core`` (same forward and backward functions): a custom op's
    Python dispatch with autograd costs about three times the host time of a Function call."""

    @staticmethod
    def forward(ctx, q, k, u, v, r, config):
        ctx.save_for_backward(q, k, u, v, r)
        return flash_mhf(q, k, u, v, r, config=config)  # grad is off here: the inference fast path

    @staticmethod
    def backward(ctx, ds):
        return _gradients(ctx, ds, core_backward)


# Inference fast path. Everything core_forward checks is a function of this signature, so after
# the first validated call with a signature, a call is: signature, one dict hit, empty_like, launch;
# the launch skips Triton's JIT dispatch (see direct_launch). A plan is
# (H * d_h, spec key, device index, {token count: DirectLauncher of the config dispatch chose}).
_fast_plans: dict[tuple, tuple[int, tuple, int | None, dict]] = {}
dispatch.on_reset(_fast_plans.clear)
dispatch.on_reset(scratch.clear)  # the per-stream scratch memory of the launch paths


@functools.cache
def _gpu_count() -> int:
    return torch.cuda.device_count()


def launches_directly(device_index: int | None) -> bool:
    """Whether tensors on this device (None: not a GPU) may take the launch paths that skip Triton's
    JIT. Those launch on the tensors' device, with kernels set up on the device that was current at
    their first launch, and the JIT launches on the current device: they agree on a machine with one
    GPU, and on any machine while the tensors are on the current device (one GPU per process, as
    under DDP). Checked when a fast path is set up and on every call of it."""
    return device_index is None or _gpu_count() <= 1 or device_index == torch.cuda.current_device()


def _remember_plan(q, k, u, v, r) -> None:
    """After a validated call: remember its signature if the fast path can serve it."""
    if not uses_kernels(q.device) or widened_in_interpreter(q):
        return
    if not (q.is_contiguous() and r.is_contiguous() and k.is_contiguous() and u.is_contiguous()
            and v.is_contiguous()):
        return
    if not launches_directly(q.device.index):
        return  # on another device than the current one: keep the slow path
    n_heads, n_kv, head_dim, n_exp, d_e = check_core_inputs(q, k, u, v, r)
    spec_key = ("fwd", n_heads, n_kv, head_dim, n_exp, d_e, DTYPE_NAMES[q.dtype])
    if kernel_shape_key(*spec_key[1:]) != spec_key[1:]:
        return  # a padded layer: core_forward pads its tensors on every call
    signature = (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, u.shape, u.dtype, u.device,
                 v.shape, v.dtype, v.device, r.shape, r.dtype, r.device)
    _fast_plans[signature] = (n_heads * head_dim, spec_key, q.device.index, {})


def fast_launcher(spec_key: tuple, n_tokens: int, device_index: int | None) -> Callable | None:
    """The launcher, for contiguous inputs, of the config dispatch chose for this token count:
    ``launcher(q, k, u, v, r, out)``. ``fwd`` with pointer loads (decode sizes, where host time
    matters most) launches its precomputed plan directly; the kinds whose launch builds tensor
    descriptors (``fwd`` with TMA, ``fwd_ws``) keep dispatch's launcher, which replays them."""
    config = dispatch.memoised_config(spec_key, n_tokens, device_index)
    if not config:
        return None
    if spec_key[0] == "fwd" and not config.get("tma"):
        module = runtime_load(Spec(*spec_key))
        return DirectLauncher(module, module.contiguous_plan(n_tokens, **config), device_index)
    return dispatch.bound_launcher(spec_key, n_tokens, device_index)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed where nothing has)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def flash_mhf(
    q: torch.Tensor,
    k: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    *,
    config: Config | None = None,
) -> torch.Tensor:
    """FlashMHF core: ``s[t,h] = sum_e r[t,h,e] (silu(q K_e^T) * q U_e^T) V_e`` for each token and head.

    q: (..., H, d_h); k, u, v: (H_kv, E, d_e, d_h); r: (..., H, E), fp32 or q's dtype. Returns s
    shaped like q. ``config`` pins a config of the forward kind ``fwd`` (see ``flashmhf show``); by
    default the kind and config tuned for this GPU and token count are used, else a safe default.
    The backward always takes the tuned or default config of each of its kinds.

    DTensors sharded over heads (tensor parallelism, see ``flashmhf_runtime.parallel``) run on each
    rank's local heads.
    """
    if type(q) is not torch.Tensor and is_dtensor(q):
        from flashmhf_runtime.parallel import flash_mhf_on_local_shards

        return flash_mhf_on_local_shards(q, k, u, v, r, config=config)
    try:
        return _flash_mhf(q, k, u, v, r, config)
    except AttributeError:  # not a tensor (a numpy array, a list): say which argument, not the attribute
        check_core_inputs(q, k, u, v, r)
        raise


def _flash_mhf(q, k, u, v, r, config: Config | None) -> torch.Tensor:
    # Inlined checks: this is the per-call path of inference (see _fast_plans).
    if torch.compiler.is_compiling():
        return core_op(q, k, u, v, r, config_to_str(config))
    if torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or u.requires_grad or v.requires_grad or r.requires_grad):
        return _Core.apply(q, k, u, v, r, config)
    if config is None:
        plan = _fast_plans.get((q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, u.shape, u.dtype,
                                u.device, v.shape, v.dtype, v.device, r.shape, r.dtype, r.device))
        if plan is not None and q.is_contiguous() and r.is_contiguous() and k.is_contiguous() and \
                u.is_contiguous() and v.is_contiguous() and launches_directly(plan[2]):
            row, spec_key, device_index, launchers = plan
            out = torch.empty_like(q)
            n_tokens = q.numel() // row
            launcher = launchers.get(n_tokens)
            if launcher is not None:
                launcher(q, k, u, v, r, out)
                return out
            kind = kind_for(FORWARD, spec_key[1:], n_tokens, q.device)
            if n_tokens == 0 or kind is None:  # nothing to launch, or no kernel: the validated path
                return core_forward(q, k, u, v, r, None)
            spec_key = (kind, *spec_key[1:])
            dispatch.launch(spec_key, n_tokens, device_index, q, k, u, v, r, out)
            launchers[n_tokens] = fast_launcher(spec_key, n_tokens, device_index)
            return out
        s = core_forward(q, k, u, v, r, None)
        _remember_plan(q, k, u, v, r)
        return s
    return core_forward(q, k, u, v, r, config)
