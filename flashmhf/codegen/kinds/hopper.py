"""What the warp-specialized Gluon kinds (fwd_ws, bwd_dq_ws, bwd_dkuv_ws) need of a shape and a
device: 16-bit inputs, power-of-two head dims, 64-wide tiles inside one sub-network, and a Hopper GPU
with Gluon. Each names the plain Triton kind that runs what it cannot."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable

from flashmhf.codegen.kinds.base import SMEM_BYTES, Config, first_accepted
from flashmhf.codegen.spec import Spec, SpecError

HEAD_DIMS = (32, 64, 128)  # power-of-two tiles; the largest that the register budgets were checked at is 128
TILE = 64  # d_ff tile of every warp-specialized kind: one warp group's MMA side
# Below this many tokens fwd_ws and bwd_dq_ws leave the work to fwd and bwd_dq (decode sizes: fwd's
# split d_ff and direct launch path; few 128-token programs).
MIN_TOKENS = 1024


def shape_reason(spec: Spec, plain_kind: str) -> str | None:
    """Why a warp-specialized kind cannot take this layer shape and dtype (``None`` = it can)."""
    if spec.dtype not in ("bf16", "fp16"):
        return f"the warp-group MMA kernel takes 16-bit inputs, not {spec.dtype} ({plain_kind} runs it)"
    if spec.head_dim not in HEAD_DIMS:
        return f"head_dim={spec.head_dim} is not one of {HEAD_DIMS} ({plain_kind} handles it)"
    if spec.expert_dim % TILE:
        return f"expert_dim={spec.expert_dim} is not a multiple of {TILE} (a tile must stay in one sub-network)"
    return None


def device_reason(capability: tuple[int, int] | None) -> str | None:
    """Why a device of this compute capability cannot run a warp-specialized kind (``None`` = it can).
    ``capability`` is ``None`` for no CUDA device."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton's interpreter cannot run Gluon kernels"
    if capability is None:
        return "needs an NVIDIA GPU"
    if capability[0] != 9:
        return f"needs a Hopper GPU (compute capability 9.x), this one is {capability[0]}.{capability[1]}"
    if importlib.util.find_spec("triton.experimental.gluon") is None:
        return "this Triton has no Gluon (triton.experimental.gluon)"
    return None


def reject(spec: Spec, plain_kind: str, smem: int, tokens: int | None = None, min_tokens: int = 0) -> str | None:
    """What every warp-specialized kind checks of a config: the shape, its shared memory estimate
    ``smem``, and (for kinds that serve large token counts only) ``tokens >= min_tokens``."""
    reason = shape_reason(spec, plain_kind)
    if reason:
        return reason
    if smem > SMEM_BYTES:
        return f"needs ~{smem // 1024} KiB shared memory, more than {SMEM_BYTES // 1024} KiB"
    if tokens is not None and tokens < min_tokens:
        return f"below {min_tokens} tokens the plain kernel ({plain_kind}) is the one to run"
    return None


def default(name: str, spec: Spec, plain_kind: str, reject_config: Callable[[Spec, Config, int | None], str | None],
            candidates: Iterable[Config]) -> Config:
    """The first of ``candidates`` that ``reject_config`` accepts; ``SpecError`` for a shape the kind
    ``name`` cannot take at all (the op then runs ``plain_kind``)."""
    reason = shape_reason(spec, plain_kind)
    if reason:
        raise SpecError(f"{name} cannot run {spec.label()}: {reason}")
    return first_accepted(reject_config, spec, candidates)
