"""What the warp-specialized Gluon kinds (fwd_ws, bwd_dq_ws, bwd_dkuv_ws) need of a shape and an
architecture: 16-bit inputs, power-of-two head dims (and 96, as 64 + 32 column parts),
64-wide tiles inside one sub-network, and a GPU with warp-group MMA, TMA and Gluon (``NEEDS``:
Hopper). Each names the plain Triton kind that runs what it cannot (its ``fallback``)."""

from __future__ import annotations

from collections.abc import Iterable

from flashmhf.codegen.arch import GLUON, TMA, WGMMA, Arch
from flashmhf.codegen.kinds.base import Config, Reject, first_accepted, resource_reason
from flashmhf.codegen.spec import Spec, SpecError

NEEDS = frozenset({WGMMA, TMA, GLUON})
HEAD_DIMS = (32, 64, 128)  # power-of-two tiles; the largest that the register budgets were checked at is 128
# A kind whose template handles a head in power-of-two column parts (plan's d_h_parts) also takes 96:
# 64 + 32, no padded tensor-core work.
SPLIT_HEAD_DIMS = (32, 64, 96, 128)
TILE = 64  # d_ff tile of every warp-specialized kind: one warp group's MMA side
# Below this many tokens fwd_ws and bwd_dq_ws leave the work to fwd and bwd_dq (decode sizes: fwd's
# split d_ff and direct launch path; few 128-token programs).
MIN_TOKENS = 1024


def shape_reason(spec: Spec, plain_kind: str, head_dims: tuple[int, ...] = HEAD_DIMS) -> str | None:
    """Why a warp-specialized kind that takes ``head_dims`` cannot take this layer shape and dtype
    (``None`` = it can)."""
    if spec.dtype not in ("bf16", "fp16"):
        return f"the warp-group MMA kernel takes 16-bit inputs, not {spec.dtype} ({plain_kind} runs it)"
    if spec.head_dim not in head_dims:
        return f"head_dim={spec.head_dim} is not one of {head_dims} ({plain_kind} handles it)"
    if spec.expert_dim % TILE:
        return f"expert_dim={spec.expert_dim} is not a multiple of {TILE} (a tile must stay in one sub-network)"
    return None


def reject(spec: Spec, plain_kind: str, smem: int, arch: Arch, head_dims: tuple[int, ...] = HEAD_DIMS) -> str | None:
    """What every warp-specialized kind checks of a config: the shape and its shared memory
    estimate ``smem`` on ``arch`` (the register budget is fixed in the templates)."""
    return shape_reason(spec, plain_kind, head_dims) or resource_reason(smem, None, arch)


def default(name: str, spec: Spec, plain_kind: str, reject_config: Reject, arch: Arch,
            candidates: Iterable[Config], head_dims: tuple[int, ...] = HEAD_DIMS) -> Config:
    """The first of ``candidates`` that ``reject_config`` accepts; ``SpecError`` for a shape the kind
    ``name`` cannot take at all (the op then runs ``plain_kind``)."""
    reason = shape_reason(spec, plain_kind, head_dims)
    if reason:
        raise SpecError(f"{name} cannot run {spec.label()}: {reason}")
    return first_accepted(reject_config, spec, arch, candidates, name)
