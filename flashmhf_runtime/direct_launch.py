"""Launch a rendered module's launch plan straight through Triton's compiled kernels.

``kernel[grid](*args)`` runs Triton's JIT dispatch on every call (bind the arguments, specialise
them, hash a cache key, look the compiled kernel up): ~15 µs per launch on a GPU host, several
times the launch itself. A ``DirectLauncher`` serves one plan (one token count, one config): its
first call launches through the JIT and keeps each step's CompiledKernel; later calls hand the
precomputed arguments, with only the tensors substituted, to ``compiled.run`` (the C launcher).

That is valid while the JIT would pick the same compiled kernel. Everything it specialises on is
fixed by the plan (ints, constexprs, launch options) or by the caller's signature (dtypes, device),
except pointer alignment: Triton specialises pointers on 16-byte alignment, so a call whose tensors
are not all 16-byte aligned takes the JIT path. So does every call while a launch hook is set
(profilers), under TRITON_INTERPRET=1 (no compiled kernels), and whenever the setup met something
it does not expect, so the direct path can only ever make a call cheaper, never break it.

Launches go to the current stream of ``device_index``; the JIT launches on the current device, so
the caller must ensure they are the same (the op checks it: `op.launches_directly`).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from types import ModuleType

from flashmhf_runtime import scratch

log = logging.getLogger("flashmhf.direct_launch")

_MISSING = object()


def argument_values(kernel, args: Sequence, kwargs: dict) -> tuple:
    """The values of all of ``kernel``'s parameters, in parameter order, as Triton's binder binds
    ``kernel[grid](*args, **kwargs)`` (constexprs included; launch options such as num_warps, which
    are not parameters, left out). ValueError when the call does not bind."""
    names = list(kernel.arg_names)
    if len(args) > len(names):
        raise ValueError(f"{len(args)} positional arguments for {len(names)} parameters")
    signature = getattr(kernel, "signature", None)
    defaults = {} if signature is None else {
        name: p.default for name, p in signature.parameters.items() if p.default is not p.empty
    }
    values = list(args)
    for name in names[len(args):]:
        value = kwargs.get(name, defaults.get(name, _MISSING))
        if value is _MISSING:
            raise ValueError(f"no value for parameter {name!r}")
        values.append(value)
    doubled = [name for name in names[: len(args)] if name in kwargs]
    if doubled:
        raise ValueError(f"parameters {doubled} given twice")
    return tuple(values)


def _triton_binder_values(kernel, args: Sequence, kwargs: dict) -> tuple | None:
    """What Triton's own binder makes of the call (JITFunction.run passes ``bound_args.values()``),
    or None where this Triton keeps its binder elsewhere."""
    device_caches = getattr(kernel, "device_caches", None)
    if device_caches is None:
        return None
    from triton.runtime import driver

    binder = device_caches[driver.active.get_current_device()][4]
    bound_args, _specialization, _options = binder(*args, **kwargs)
    return tuple(bound_args.values())


def _same_values(a: Sequence, b: Sequence) -> bool:
    """Same length, the same tensors (by identity) and equal other values."""
    return len(a) == len(b) and all(
        x is y or (not hasattr(x, "data_ptr") and not hasattr(y, "data_ptr") and x == y) for x, y in zip(a, b)
    )


def _stream_getter() -> Callable[[int | None], int]:
    """Triton's own current-stream query (torch's raw CUDA stream of a device index)."""
    from triton.runtime import driver

    return driver.active.get_current_stream


def _hooks_idle(runtime_knobs) -> bool:
    """No launch hook is set (Triton 3.6 keeps empty HookChains there; older ones None)."""
    for hook in (runtime_knobs.launch_enter_hook, runtime_knobs.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class _Step:
    """One precomputed launch: ``run(gx, gy, gz, stream, function, packed_metadata, None, None,
    None, *pick(env + consts))``, where env is the call's tensors in slot order."""

    __slots__ = ("run", "grid", "function", "metadata", "consts", "pick")

    def __init__(self, compiled, grid: tuple, pick: Callable, consts: tuple):
        self.run = compiled.run  # the launcher (a property: binds the loaded binary once)
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.grid = (*grid, 1, 1)[:3]
        self.consts = consts
        self.pick = pick


class DirectLauncher:
    """``launcher(*tensors)`` launches ``plan`` of ``module`` on the tensors of ``module.SLOTS``
    (for fwd: q, k, u, v, r, out).

    The plan's workspace and, for a plan with ``counters`` (kernels that count their programs in
    zeroed int32 memory and zero it again before they finish), its counters are the stream's
    scratch (``flashmhf_runtime.scratch``: shared by the launches of a stream, fresh during CUDA
    graph capture)."""

    def __init__(self, module: ModuleType, plan, device_index: int | None):
        self.module = module
        self.plan = plan
        self.device_index = device_index
        self.slots = tuple(module.SLOTS)
        self.n_counters = getattr(plan, "counters", 0)
        self.ws_numel = 0 if plan.workspace is None else math.prod(plan.workspace)
        counters_slot = (module.COUNTERS_SLOT,) if self.n_counters else ()
        self.env_slots = (*self.slots, module.WORKSPACE_SLOT, *counters_slot)
        self.direct: list[_Step] | None = None  # set up after the first aligned JIT launch
        self.gave_up = False  # the direct path cannot serve this plan (interpreter, unknown Triton)
        self._stream: Callable | None = None
        self._knobs = None

    def __call__(self, *tensors) -> None:
        direct = self.direct
        if direct is not None and _hooks_idle(self._knobs):
            for t in tensors:
                if t.data_ptr() & 15:
                    break
            else:
                stream = self._stream(self.device_index)
                if self.ws_numel or self.n_counters:
                    env = tensors + self._scratch_for(stream, tensors[0])
                else:
                    env = tensors + (None,)
                for s in direct:
                    s.run(*s.grid, stream, s.function, s.metadata, None, None, None, *s.pick(env + s.consts))
                return
        self._jit(tensors)

    def _scratch_for(self, stream: int, like) -> tuple:
        """(workspace or None[, counters]) for a launch on ``stream``."""
        ws, counters = scratch.take(self.device_index, stream, like, self.ws_numel, self.module.WORKSPACE_DTYPE,
                                    self.n_counters)
        return (ws, counters) if self.n_counters else (ws,)

    def _jit(self, tensors: tuple) -> None:
        """Launch through Triton's JIT, then set the direct path up if it has not been yet."""
        named = dict(zip(self.slots, tensors))
        results = self.module.run_plan(self.plan, named)
        if self.direct is None and not self.gave_up:
            try:
                self.direct = self._setup(results, named)
            except Exception as exc:  # noqa: BLE001 - anything unexpected: keep the JIT path
                self.gave_up = True
                log.debug("direct launch disabled for %s: %s: %s", self.module.__name__, type(exc).__name__, exc)

    def _setup(self, results: list, named: dict) -> list[_Step] | None:
        """The precomputed steps; None to retry at the next call (a pointer was not 16-byte aligned,
        so the compiled kernels may be specialised for that)."""
        if any(compiled is None for compiled in results):
            raise RuntimeError("the JIT returned no compiled kernel (TRITON_INTERPRET=1?)")
        for name in self.env_slots:
            if name in named and named[name].data_ptr() & 15:
                return None
        import triton

        self._knobs = triton.knobs.runtime
        self._stream = _stream_getter()
        steps = []
        for step, compiled in zip(self.plan.steps, results, strict=True):
            if hasattr(compiled, "result"):  # a future, where the JIT compiles asynchronously
                compiled = compiled.result()
            values = argument_values(step.kernel, step.args, step.kwargs)
            built = [v for v in values if not isinstance(v, (str, int, float, bool, type(None)))]
            if built:  # e.g. a tensor descriptor the plan builds per call: only the JIT path builds it
                raise RuntimeError(f"plan arguments built per call: {built}")
            real = [named[v] if isinstance(v, str) else v for v in values]
            real_args = [named[a] if isinstance(a, str) else a for a in step.args]
            expected = _triton_binder_values(step.kernel, real_args, step.kwargs)
            if expected is not None and not _same_values(expected, real):
                raise RuntimeError(f"argument order of {step.kernel} differs from Triton's binder")
            steps.append(self._step(compiled, step.grid, values))
        return steps

    def _step(self, compiled, grid: tuple, values: tuple) -> _Step:
        """Precompute one step: tensor slots index the call's env, the rest index ``consts``."""
        if self.module.WORKSPACE_SLOT in values and self.plan.workspace is None:
            raise ValueError("a step uses the workspace slot but the plan has no workspace")
        consts = tuple(v for v in values if not isinstance(v, str))
        indices, n_const = [], 0
        for v in values:
            if isinstance(v, str):
                indices.append(self.env_slots.index(v))
            else:
                indices.append(len(self.env_slots) + n_const)
                n_const += 1
        pick = operator.itemgetter(*indices) if len(indices) > 1 else (lambda env, i=indices[0]: (env[i],))
        return _Step(compiled, grid, pick, consts)
