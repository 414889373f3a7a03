"""Derived constants a template needs for one spec: everything computed once, before rendering."""

from __future__ import annotations

from dataclasses import dataclass

from flashmhf.codegen.dtypes import DTYPE_TABLE
from flashmhf.codegen.kinds import get_kind
from flashmhf.codegen.kinds.base import next_pow2
from flashmhf.codegen.spec import Spec, validate_spec


@dataclass(frozen=True)
class Plan:
    spec: Spec
    d_pad: int  # head dim padded to a power of two of at least 16 (tl.arange / tl.dot need one)
    mask_d: bool  # whether loads and stores along d_h need a mask
    group: int  # query heads per kv head
    d_ff: int
    # d_h as power-of-two column parts, widest first (96 -> 64 + 32): templates whose register tiles
    # must be powers of two handle a head part by part instead of padding it.
    d_h_parts: tuple[int, ...]
    tl_dtype: str
    # fp32 inputs are multiplied exactly (ieee); 16-bit inputs use the tensor cores' native mode.
    dot_precision: str

    def template_vars(self) -> dict:
        s = self.spec
        return {
            "spec": s,
            "H": s.n_heads,
            "H_KV": s.n_kv_heads,
            "GROUP": self.group,
            "D_H": s.head_dim,
            "D_PAD": self.d_pad,
            "MASK_D": self.mask_d,
            "E": s.n_experts,
            "D_E": s.expert_dim,
            "D_FF": self.d_ff,
            "D_H_PARTS": list(self.d_h_parts),
            "E_PAD": max(16, next_pow2(s.n_experts)),  # router logits as one tensor-core tile
            "DTYPE": self.tl_dtype,
            "DOT_PRECISION": self.dot_precision,
        }


def power_of_two_parts(n: int) -> tuple[int, ...]:
    """``n`` (> 0) as a sum of distinct powers of two, largest first: 96 -> (64, 32), 128 -> (128,)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return tuple(1 << b for b in reversed(range(n.bit_length())) if n >> b & 1)


def plan(spec: Spec) -> Plan:
    """Validate ``spec`` (raising ``SpecError`` with the reason) and derive its constants."""
    from flashmhf.codegen.kinds import KINDS

    validate_spec(spec, tuple(KINDS))
    get_kind(spec.kind)
    d_pad = max(16, next_pow2(spec.head_dim))  # an MMA's K side is at least 16
    return Plan(
        spec=spec,
        d_pad=d_pad,
        mask_d=d_pad != spec.head_dim,
        group=spec.group,
        d_ff=spec.d_ff,
        d_h_parts=power_of_two_parts(spec.head_dim),
        tl_dtype=DTYPE_TABLE[spec.dtype].triton,
        dot_precision="ieee" if DTYPE_TABLE[spec.dtype].exact else "tf32",
    )
