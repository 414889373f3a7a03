"""Test shim: make Triton 3.6's CPU interpreter compute bf16 correctly.

The interpreter stores bf16 as raw uint16 and its ``tl.dot`` multiplies those bit patterns, and it
truncates fp32 -> bf16 instead of rounding to nearest even. This shim widens bf16 operands of a dot
to fp32 exactly (a bf16 is the top half of an fp32) and rounds casts to bf16 like the GPU does.
It changes nothing on the GPU and is installed only by the test suite.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_installed = False


def _widen(handle: interpreter.TensorHandle) -> interpreter.TensorHandle:
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    wide = (handle.data.astype(np.uint32) << 16).view(np.float32)
    return interpreter.TensorHandle(wide, tl.float32)


def _round_to_bf16(data: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest, ties to even
    out = (rounded >> 16).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), out)


def install() -> None:
    global _installed
    if _installed:
        return
    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot
    original_cast = builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float16, tl.float64):
            return interpreter.TensorHandle(_round_to_bf16(src.data.astype(np.float32)), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    for name in ("create_fp_ext", "create_fp_trunc"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    _installed = True
