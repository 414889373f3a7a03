"""Skip Triton's JIT dispatch for repeated launches of a rendered module's kernels.

``kernel[grid](*args, **kwargs)`` binds and specialises every argument and hashes a cache key on
each call: ~50-100 µs of host time per launch of the Gluon kinds (their launch builds tensor
descriptors, whose specialisation is the costliest part), several times the launch itself. A
training step launches three of them, so at small and mid token counts it was host-bound.

``install(module)`` wraps each launched kernel of a rendered module (the ``flashmhf_*`` JIT
functions; helpers called from kernels are left alone) in a ``MemoKernel``. Its first launch for a
call key goes through the JIT and keeps the compiled kernel; later launches with the same key hand
the arguments straight to the compiled kernel's launcher, exactly as the JIT would after finding
that kernel in its own cache. The key is at least as fine as Triton's specialisation: tensors by
dtype and 16-byte alignment, tensor descriptors by base dtype and alignment, shape, strides, block
shape and layout, ints and every other value by value, plus the grid and the current device. A
launch hook (profilers) or anything unhashable takes the JIT path. Unlike ``DirectLauncher`` (which
precomputes a whole launch plan), this serves any launch code, descriptors built per call included.

While ``RECORDING.launches`` is a list (``replay_launch`` sets it), each launch appends what it
launched (compiled kernel, grid, device, argument values), or None where it cannot be replayed.
"""

from __future__ import annotations

import threading
from types import ModuleType

from flashmhf.codegen import Spec, load
from flashmhf_runtime.direct_launch import _hooks_idle, _stream_getter, argument_values

_PREFIX = "flashmhf_"


class _Recording(threading.local):
    """Per thread: None, or the list that each MemoKernel launch appends itself to (replay_launch)."""

    launches: list | None = None


RECORDING = _Recording()


def _arg_key(a) -> object:
    """What of one argument the compiled kernel depends on (see the module docstring)."""
    data_ptr = getattr(a, "data_ptr", None)
    if data_ptr is not None:
        return (a.dtype, data_ptr() & 15 == 0)
    base = getattr(a, "base", None)
    if base is not None and hasattr(a, "block_shape"):
        return (type(a), base.dtype, base.data_ptr() & 15 == 0, tuple(a.shape), tuple(a.strides),
                tuple(a.block_shape), getattr(a, "layout", None), getattr(a, "padding", None))
    if isinstance(a, float):
        return float
    return (type(a), a)


class MemoKernel:
    """A JIT function whose repeated launches skip the JIT's dispatch; otherwise the same object
    (attribute access goes to the wrapped kernel)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._launches: dict[tuple, tuple] = {}
        self._stream = None
        self._device = None
        self._knobs = None

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        if self._knobs is None:
            import triton
            from triton.runtime import driver

            self._knobs = triton.knobs.runtime
            self._stream = _stream_getter()
            self._device = driver.active.get_current_device
        if callable(grid) or not _hooks_idle(self._knobs):
            if RECORDING.launches is not None:
                RECORDING.launches.append(None)  # a launch that cannot be replayed
            return self.kernel[grid](*args, **kwargs)
        device = self._device()
        try:
            key = (device, tuple(grid), tuple(_arg_key(a) for a in args), tuple(kwargs.items()))
            hit = self._launches.get(key)
        except TypeError:  # an unhashable argument: no memo
            key = hit = None
        values = None
        if hit is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if key is not None and compiled is not None and not hasattr(compiled, "result"):
                hit = self._launches[key] = (compiled, (*grid, 1, 1)[:3])
        else:
            compiled, grid3 = hit
            values = argument_values(self.kernel, args, kwargs)
            compiled.run(*grid3, self._stream(device), compiled.function, compiled.packed_metadata, None, None,
                         None, *values)
        if RECORDING.launches is not None:
            RECORDING.launches.append(None if hit is None else (
                compiled, hit[1], device, values or argument_values(self.kernel, args, kwargs)))
        return compiled


def install(module: ModuleType) -> ModuleType:
    """Wrap the launched kernels of a rendered module (idempotent). Under Triton's interpreter the
    kernels are not JIT functions and stay as they are."""
    from triton.runtime.jit import JITFunction

    for name, value in list(vars(module).items()):
        if name.startswith(_PREFIX) and isinstance(value, JITFunction):
            setattr(module, name, MemoKernel(value))
    return module


def runtime_load(spec: Spec) -> ModuleType:
    """``codegen.load`` with the module's kernels wrapped by ``install`` (idempotent, so a module
    loaded again, e.g. for another token count, is left as it is)."""
    return install(load(spec))
