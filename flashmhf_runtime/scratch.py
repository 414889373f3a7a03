"""Scratch memory of the launches that need it: a d_ff split's fp32 partials (the workspace) and the
zeroed int32 counters in which its programs count themselves.

Launches on one CUDA stream run one after another, so every launch on a stream shares one workspace
(grown to the largest asked for) and one counter buffer (every launch leaves the counters zeroed, as
it found them): no allocation per call, which shows at decode sizes. During CUDA graph capture each
call gets fresh memory instead (from the graph's pool; the zeroing becomes a memset node), so a graph
never shares scratch with eager launches or other graphs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_workspace: dict[tuple, torch.Tensor] = {}  # (device index, raw stream, dtype) -> buffer
_counters: dict[tuple, torch.Tensor] = {}  # (device index, raw stream) -> zeroed int32 buffer


@functools.cache
def _has_cuda() -> bool:
    return torch.cuda.is_available()


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False where torch has no CUDA)."""
    return _has_cuda() and torch.cuda.is_current_stream_capturing()


def take(device_index: int | None, stream: int, like: torch.Tensor, ws_numel: int, ws_dtype: torch.dtype,
         n_counters: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(workspace of at least ``ws_numel`` elements, zeroed counters of at least ``n_counters``) for
    a launch on ``stream`` of device ``device_index``, made like ``like``; None for a size of 0."""
    if capturing():
        return (like.new_empty(ws_numel, dtype=ws_dtype) if ws_numel else None,
                like.new_zeros(n_counters, dtype=torch.int32) if n_counters else None)
    ws = counters = None
    if ws_numel:
        key = (device_index, stream, ws_dtype)
        ws = _workspace.get(key)
        if ws is None or ws.numel() < ws_numel:
            ws = _workspace[key] = like.new_empty(ws_numel, dtype=ws_dtype)
    if n_counters:
        key = (device_index, stream)
        counters = _counters.get(key)
        if counters is None or counters.numel() < n_counters:
            counters = _counters[key] = like.new_zeros(n_counters, dtype=torch.int32)
    return ws, counters


def clear() -> None:
    """Drop every buffer (the runtime's reset)."""
    _workspace.clear()
    _counters.clear()


class ScratchLauncher:
    """``launcher(*args)`` calls ``inner(*args, ws, counters)`` with the stream's scratch, sized by
    the module's ``scratch(args[0], **config)`` -> (fp32 workspace elements, counters). The same
    memory on every call of a stream, so a replaying ``inner`` replays."""

    def __init__(self, inner: Callable, sizes: Callable, config: dict):
        self.inner = inner
        self.sizes = sizes
        self.config = config
        self._stream: Callable[[int | None], int] | None = None

    def __call__(self, *args) -> None:
        like = args[0]
        n_ws, n_counters = self.sizes(like, **self.config)
        device_index = like.device.index
        stream = 0
        if like.is_cuda:
            if self._stream is None:
                from flashmhf_runtime.direct_launch import _stream_getter  # imports this module

                self._stream = _stream_getter()
            stream = self._stream(device_index)
        ws, counters = take(device_index, stream, like, n_ws, torch.float32, n_counters)
        return self.inner(*args, ws, counters)
