"""The data types a kernel can be generated for: one table, from which every per-dtype map derives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # as in a Spec and on the command line, e.g. "bf16"
    torch_name: str  # attribute of the torch module, e.g. "bfloat16"
    triton: str  # as written in a template, e.g. "tl.bfloat16"
    bytes: int
    # Products multiplied exactly (tl.dot's input_precision="ieee"): FMA instructions, not tensor
    # cores, which hold far more per thread (the kinds' register counts know it).
    exact: bool = False


DTYPE_TABLE: dict[str, DType] = {d.name: d for d in (
    DType("bf16", "bfloat16", "tl.bfloat16", 2),
    DType("fp16", "float16", "tl.float16", 2),
    DType("fp32", "float32", "tl.float32", 4, exact=True),
)}
DTYPES: tuple[str, ...] = tuple(DTYPE_TABLE)
DTYPE_BYTES: dict[str, int] = {n: d.bytes for n, d in DTYPE_TABLE.items()}


def torch_dtypes() -> dict:
    """Spec dtype name -> torch dtype (torch is imported here, not by codegen as a whole)."""
    import torch

    return {n: getattr(torch, d.torch_name) for n, d in DTYPE_TABLE.items()}
