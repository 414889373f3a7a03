"""The layer's head RMSNorm and router as generated kernels, around the core (issue: the fused layer).

Forward (``norm_router``; ``router`` for a layer without head norm): per (token block, head) one
program normalises q (fp32), stores qn in q's dtype, multiplies qn by the router weights W_r[h]
(one (BLOCK_T x d_h) x (d_h x E) tensor-core product) and stores r = normalise(sigmoid(.)) in fp32.
Backward (``norm_router_bwd`` / ``router_bwd``): recomputes qn and the router, adds the router's
part to the core's dqn, goes back through the norm, writes dq, and sums dW_r (and dw_norm) over
tokens in registers: per head, ``split`` programs each take every ``split``-th token block and write
one fp32 partial; a second small kernel sums the partials (deterministic: no atomics).

All four read d_h padded to a power of two and E padded to a power of two >= 16; they use neither
H_kv nor d_e, which are in the spec only because every kind shares the layer's key.
"""

from __future__ import annotations

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds.base import (
    DTYPE_BYTES,
    NORM_ROUTER,
    NORM_ROUTER_BWD,
    ROUTER,
    ROUTER_BWD,
    Config,
    KernelKind,
    Param,
    Role,
    cdiv,
    first_accepted,
    fma_product_regs,
    fma_products,
    next_pow2,
    resource_reason,
)
from flashmhf.codegen.spec import Spec

# The backward's default split aims at this many programs per SM (264 on an H200's 132 SMs).
PROGRAMS_PER_SM = 2


def e_pad(spec: Spec) -> int:
    return max(16, next_pow2(spec.n_experts))


# The backward before Hopper (mma.sync): a warp's MMA tile has at least 16 token rows, so with
# fewer rows per warp each warp also holds copies of the rows it does not own; the norm's backward
# also keeps the weights whole per warp. (Row copies, weight copies) by head norm, calibrated on
# ptxas reports for sm_80 and sm_86 at 4 and 8 warps (``flashmhf show --resources --capability``).
_MMA_SYNC_COPIES = {False: (1, 0.0), True: (4, 0.375)}


# The forward's one exact product (q W_r) holds a quarter of what ``fma_product_regs`` counts for
# the backward's three (ptxas, fp32, sm_80 and sm_90, d_h 96 and 128, E 8 and 22).
FMA_FORWARD_SHARE = 4


def _mma_sync_regs(spec: Spec, c: Config) -> int:
    """What a mma.sync backward holds per thread beyond the strict count: replicated token rows and
    per-warp weights."""
    d_pad, ep = next_pow2(spec.head_dim), e_pad(spec)
    rows_owned = c["block_t"] / c["num_warps"]
    row_copies, weight_copies = _MMA_SYNC_COPIES[spec.kind.startswith("norm_")]
    return int(row_copies * (max(16, rows_owned) - rows_owned) * d_pad / 32 + weight_copies * d_pad * ep / 32)


def estimate_regs(spec: Spec, c: Config, backward: bool, strict: bool = False, arch: Arch | None = None) -> int:
    """fp32 values per thread: copies of the (BLOCK_T x d_h) tile alive at once, the logits-sized
    tiles, the backward's dW_r accumulator, plus fixed overhead. ``strict`` counts every copy the
    compiler may keep (forward: q, its fp32 form, the normalised and the stored qn; backward: those
    plus q_hat, dqn, gw and dq), and for a backward with exact (fp32) products their FMA operands,
    else on a mma.sync ``arch`` (before Hopper) what :func:`_mma_sync_regs` adds: calibrated on
    ptxas reports (``flashmhf show --resources``, sm_80, sm_86 and sm_90), it picks defaults that
    compile without spills. The lenient count prunes the tuner's space only of what cannot be fast:
    measured winners on the H200 spill a few bytes or none."""
    d_pad, ep = next_pow2(spec.head_dim), e_pad(spec)
    copies, logit_tiles = ((8, 4) if backward else (4, 2)) if strict else ((4, 3) if backward else (2, 2))
    tiles = c["block_t"] * d_pad * copies + c["block_t"] * ep * logit_tiles
    if backward:
        tiles += d_pad * ep
    regs = tiles // (c["num_warps"] * 32) + 32
    if strict and fma_products(spec):
        product = fma_product_regs(c["block_t"], ep, d_pad, c["num_warps"])
        regs += product if backward else product // FMA_FORWARD_SHARE
    elif strict and backward and arch is not None and arch.mma == 2:
        regs += _mma_sync_regs(spec, c)
    return regs


def _smallest_block_t(spec: Spec, backward: bool) -> int:
    """The token block that decode sizes get: 16 (a tensor-core tile's side), but 32 for the forward
    with exact (fp32) products at E > 16, where every 16-token config spills (ptxas, sm_80 to sm_90)
    and 32 tokens with 8 warps do not."""
    return 32 if not backward and fma_products(spec) and e_pad(spec) > 16 else 16


def _reject(spec: Spec, c: Config, tokens: int | None, arch: Arch, backward: bool, strict: bool = False) -> str | None:
    if reason := resource_reason(0, estimate_regs(spec, c, backward, strict, arch), arch):
        return reason
    if tokens is not None:
        if c["block_t"] > max(_smallest_block_t(spec, backward), next_pow2(tokens)):
            return f"block_t={c['block_t']} is larger than the {tokens} tokens it would cover"
        if backward and c["split"] > cdiv(tokens, c["block_t"]):
            return f"split={c['split']} exceeds the {cdiv(tokens, c['block_t'])} token blocks"
    return None


def reject_forward(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return _reject(spec, c, tokens, arch, backward=False)


def reject_backward(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return _reject(spec, c, tokens, arch, backward=True)


def _safe_forward(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return _reject(spec, c, tokens, arch, backward=False, strict=True)


def _safe_backward(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    return _reject(spec, c, tokens, arch, backward=True, strict=True)


def default_forward(spec: Spec, tokens: int, arch: Arch) -> Config:
    """64-token blocks (fewer at decode sizes, down to ``_smallest_block_t``), 4 warps; 8 first with
    exact (fp32) products."""
    smallest = _smallest_block_t(spec, backward=False)
    block_t = min(64, max(smallest, next_pow2(tokens)))
    warps = (8, 4) if fma_products(spec) else (4, 8)
    candidates = [{"block_t": bt, "num_warps": w} for bt in (block_t, 32, 16) if bt >= smallest for w in warps]
    return first_accepted(_safe_forward, spec, arch, candidates, spec.kind)


def default_backward(spec: Spec, tokens: int, arch: Arch) -> Config:
    """64-token blocks and enough programs per head to fill the GPU twice over."""
    block_t = min(64, max(16, next_pow2(tokens)))
    blocks = cdiv(max(tokens, 1), block_t)
    split = 1
    while split * 2 <= blocks and split * 2 * spec.n_heads <= PROGRAMS_PER_SM * arch.sm_count:
        split *= 2
    candidates = [{"block_t": bt, "split": split, "num_warps": w} for bt in (block_t, 32, 16) for w in (4, 8)]
    return first_accepted(_safe_backward, spec, arch, candidates, spec.kind)


def flops_forward(spec: Spec, tokens: int) -> float:
    """The router product (2 T d_model E); the norm's few operations per element are not counted."""
    return 2.0 * tokens * spec.d_model * spec.n_experts


def flops_backward(spec: Spec, tokens: int) -> float:
    """Router recomputed, dqn and dW_r: three products of the forward's size."""
    return 3 * flops_forward(spec, tokens)


def bytes_forward(spec: Spec, tokens: int, norm: bool) -> int:
    """Device-memory traffic: q read (qn written, with norm) and r written in fp32."""
    b = DTYPE_BYTES[spec.dtype]
    return tokens * spec.d_model * b * (2 if norm else 1) + tokens * spec.n_heads * spec.n_experts * 4


_FORWARD_PARAMS = (
    Param("block_t", (16, 32, 64, 128), help="tokens per program (one head)"),
    Param("num_warps", (1, 2, 4, 8), help="warps per program"),
)
_BACKWARD_PARAMS = (
    Param("block_t", (16, 32, 64, 128), help="tokens per loop step"),
    Param("split", (1, 2, 4, 8, 16, 32, 64), help="programs per head, each summing its own dW_r partial"),
    Param("num_warps", (1, 2, 4, 8), help="warps per program"),
)


def _forward_kind(name: str, role: Role, what: str) -> KernelKind:
    return KernelKind(
        name=name, template="norm_router.py.jinja", description=what, role=role, params=_FORWARD_PARAMS,
        reject_fn=reject_forward, default_fn=default_forward, flops=flops_forward,
    )


def _backward_kind(name: str, role: Role, what: str) -> KernelKind:
    return KernelKind(
        name=name, template="norm_router_bwd.py.jinja", description=what, role=role, params=_BACKWARD_PARAMS,
        reject_fn=reject_backward, default_fn=default_backward, flops=flops_backward,
    )


NORM_ROUTER_KIND = _forward_kind("norm_router", NORM_ROUTER,
                                 "layer: head RMSNorm of q, then r = normalise(sigmoid(qn W_r)) (fp32)")
ROUTER_KIND = _forward_kind("router", ROUTER, "layer without head norm: r = normalise(sigmoid(q W_r)) (fp32)")
NORM_ROUTER_BWD_KIND = _backward_kind("norm_router_bwd", NORM_ROUTER_BWD,
                                      "layer backward: router and head RMSNorm, dq, dW_r, dw_norm")
ROUTER_BWD_KIND = _backward_kind("router_bwd", ROUTER_BWD, "layer backward without head norm: router, dq, dW_r")
