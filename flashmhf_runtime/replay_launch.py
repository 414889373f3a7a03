"""Replay a rendered module's launches when it is called again on the same memory.

The Gluon kinds build five to ten TMA tensor descriptors in Python on every call, then Triton turns
each into a CUtensorMap (``make_tensordesc_arg``) before the C launcher runs: ~50-100 µs of host
time per launch on a GPU host, three launches per training step, where a step at T = 1024 takes
~0.75 ms of GPU time. A training loop calls them on the same addresses step after step (the CUDA
caching allocator hands the same blocks back), so the work can be done once per address set.

``ReplayLauncher(module.launch, config)`` is called like ``module.launch(*args, **config)``. Its key
is every tensor argument's address, dtype, shape and strides, every other argument's value and the
current device. The first call for a key runs the module's launch while ``jit_memo`` records each kernel
launch (the compiled kernel, grid and argument values), and turns the record into the C launcher's
final arguments: pointers as integers, descriptors as their CUtensorMaps. Later calls with the key
hand those to the C launcher on the current stream, exactly what Triton's launcher would pass.

A record is only kept where replaying it is the same launch: every pointer it passes (tensor or
descriptor base) is the address of one of the caller's tensors, the kernel needs no global or
profile scratch, Triton's launcher has the layout this module knows, and no launch hook is set. A
call whose launch passes memory made inside it (a split's workspace, a copy of an unaligned input:
its address would be stale) is not kept, and after a few such calls in a row the launcher stops
recording. Anything else, a Triton whose launcher looks different or Triton's interpreter included,
keeps the normal path for good, so a replay can only make a call cheaper, never change it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from flashmhf.cache.device import interpreting
from flashmhf_runtime import jit_memo
from flashmhf_runtime.direct_launch import _hooks_idle, _stream_getter

log = logging.getLogger("flashmhf.replay_launch")

MAX_KEYS = 64  # address sets kept per launcher (a training loop cycles through a few)
MAX_TEMPORARY_CALLS = 3  # calls in a row on memory made inside the launch before replay is given up
ENABLED = True  # read when a launcher is made (dispatch binds one per config): False to compare without


def _key(args: tuple) -> tuple:
    """Tensors by address, dtype, shape and strides (the allocator may hand one block to tensors of
    other dtypes or shapes); everything else by value."""
    return tuple((a.data_ptr(), a.dtype, a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args)


def _raw_launch(launcher) -> Callable | None:
    """The C launch function under Triton's CudaLauncher: the attribute itself, or, where Triton
    wrapped it to expand tensor descriptors, the function that wrapper calls. None if neither."""
    fn = getattr(launcher, "launch", None)
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn  # a builtin: the C launcher
    cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
    cell = cells.get("launcher")
    raw = None if cell is None else cell.cell_contents
    return raw if raw is not None and getattr(raw, "__code__", None) is None else None


# What _step returns for a launch on memory made inside the module's launch (e.g. a copy of an
# unaligned input): this call cannot be replayed, a later one on other memory may be.
_TEMPORARY = object()


def _is_descriptor(value) -> bool:
    return hasattr(value, "base") and hasattr(value, "block_shape")


def _expand(values: tuple, metas: list | None, pointers: set[int]) -> tuple | None:
    """The C launcher's arguments for a kernel's parameter values, as Triton's descriptor wrapper
    builds them: descriptors expanded, tensors as their addresses. None where a pointer is not one
    of ``pointers`` (a temporary)."""
    from triton.backends.nvidia.driver import make_tensordesc_arg

    out: list = []
    n_desc = 0
    for value in values:
        if _is_descriptor(value):
            if value.base.data_ptr() not in pointers:
                return None
            meta = metas[n_desc] if metas else None
            n_desc += 1
            parts = make_tensordesc_arg(value, meta)
            out.extend(p.data_ptr() if isinstance(p, torch.Tensor) else p for p in parts)
        elif isinstance(value, torch.Tensor):
            if value.data_ptr() not in pointers:
                return None
            out.append(value.data_ptr())
        else:
            out.append(value)
    return tuple(out)


def _step(record, pointers: set[int]) -> tuple | object | None:
    """(C launch, grid, device, the arguments after the stream) of one recorded launch; ``_TEMPORARY``
    where it passed a pointer that is not one of ``pointers``; None where it cannot be replayed."""
    from triton.backends.nvidia import driver as nvidia_driver

    if record is None or getattr(nvidia_driver, "_BASE_ARGS_FORMAT_LEN", None) != 13:
        return None
    compiled, grid3, device, values = record
    launcher = compiled.run
    if not isinstance(launcher, getattr(nvidia_driver, "CudaLauncher", ())):  # another backend's launcher
        return None
    if getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1):
        return None
    raw = _raw_launch(launcher)
    if raw is None:
        return None
    expanded = _expand(values, getattr(compiled.metadata, "tensordesc_meta", None), pointers)
    if expanded is None:
        return _TEMPORARY
    # gridX, gridY, gridZ, stream, then: function, cooperative grid, PDL, global and profile scratch,
    # packed metadata, launch metadata, enter and exit hooks, the kernel's arguments.
    tail = (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
            compiled.packed_metadata, None, None, None, *expanded)
    return raw, grid3, device, tail


class ReplayLauncher:
    """``launcher(*args)`` runs ``launch(*args, **config)``, replayed where the same memory repeats
    (see the module docstring). Returns None."""

    def __init__(self, launch: Callable, config: dict):
        self.launch = launch
        self.config = config
        self.replays: dict[tuple, tuple | None] = {}
        # False under Triton's interpreter, or once a call could not be recorded: the plain path
        self.usable = ENABLED and not interpreting()
        self._knobs = None
        self._stream: Callable | None = None
        self._device: Callable | None = None
        self._temporaries = 0  # calls in a row whose launch passed memory made inside it

    def __call__(self, *args) -> None:
        if not self.usable:
            self.launch(*args, **self.config)
            return
        if self._knobs is None:
            import triton
            from triton.runtime import driver

            self._knobs, self._stream, self._device = (
                triton.knobs.runtime, _stream_getter(), driver.active.get_current_device)
        if not _hooks_idle(self._knobs):
            self.launch(*args, **self.config)
            return
        device = self._device()
        key = (device, *_key(args))
        try:
            steps = self.replays.get(key)
        except TypeError:  # an unhashable argument: nothing to look up by
            self.launch(*args, **self.config)
            return
        if steps is None:
            self._record(key, args)
            return
        stream = self._stream(device)
        for raw, grid3, _device, tail in steps:
            raw(*grid3, stream, *tail)

    def _record(self, key: tuple, args: tuple) -> None:
        """Launch through the module, recording its kernel launches; keep them if all can be replayed."""
        outer = jit_memo.RECORDING.launches  # a record in progress around this one
        jit_memo.RECORDING.launches = records = []
        try:
            self.launch(*args, **self.config)
        finally:
            jit_memo.RECORDING.launches = outer
            if outer is not None:  # the outer record cannot replay launches it did not see
                outer.append(None)
        pointers = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
        try:
            steps = [_step(r, pointers) for r in records]
        except Exception as exc:  # noqa: BLE001 - anything unexpected: the plain path
            log.debug("replay disabled: %s: %s", type(exc).__name__, exc)
            steps = [None]
        if any(s is _TEMPORARY for s in steps):
            # A launch that makes its own memory every time (a split's workspace) never replays:
            # after a few such calls in a row, stop paying for the records.
            self._temporaries += 1
            self.usable = self._temporaries < MAX_TEMPORARY_CALLS
            return
        self._temporaries = 0
        if not steps or any(s is None or s[2] != key[0] for s in steps):
            self.usable = False
            return
        if len(self.replays) >= MAX_KEYS:
            self.replays.clear()
        self.replays[key] = tuple(steps)
