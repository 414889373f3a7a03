"""Forward core for Hopper at mid-size token counts: ``fwd_ws`` with d_ff split between programs.

``fwd_ws`` runs one program per 128 tokens of a head, so below a few thousand tokens most SMs are
idle: 1024 tokens of 8 heads are 64 programs on an H200's 132 SMs. This kind renders the same kernel
(``fwd_ws.py.jinja``) with a third program axis that gives each program a share of the kv head's
d_ff tiles. Each 64-row group stores its fp32 partial of s, counts it in an int32 counter (after a
barrier of its warps, one atomic with acquire-release order), and the last of the split's programs
sums the partials in share order (the same result whichever finished last) and writes s. The
counters are left zeroed, so a caller may keep one buffer per stream (``scratch`` gives both sizes;
the runtime passes them).

It runs from 256 to 4096 tokens: below, ``fwd``'s smaller row tiles waste less of a 128-row
program; above, ``fwd_ws`` alone has a program for every SM and the partials would only cost memory
(split x T x d_model x 4 bytes).
"""

from __future__ import annotations

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import fwd, fwd_ws, hopper
from flashmhf.codegen.kinds.base import FORWARD, Config, KernelKind, Param
from flashmhf.codegen.spec import Spec

ROWS_PER_PROGRAM = 2 * fwd_ws.ROWS
MIN_TOKENS = 256
MAX_TOKENS = 4096


def reject(spec: Spec, c: Config, tokens: int | None, arch: Arch) -> str | None:
    if reason := fwd_ws.reject(spec, {k: c[k] for k in ("block_f", "num_stages")}, tokens, arch):
        return reason
    tiles = spec.d_ff // c["block_f"]
    if c["split"] > tiles:
        return f"split={c['split']} is more shares than d_ff's {tiles} tiles of {c['block_f']}"
    return None


def programs(spec: Spec, tokens: int) -> int:
    """Programs of ``fwd_ws`` (no split) at ``tokens``: one per 128 tokens and head."""
    return -(-tokens // ROWS_PER_PROGRAM) * spec.n_heads


# A grid "fills" the GPU with programs for this share of its SMs (128 programs on 132 SMs do).
FILLED = 0.9


def default_split(spec: Spec, tokens: int, arch: Arch, values: tuple[int, ...]) -> int:
    """The fewest shares that give (nearly) every SM a program: each share adds a partial to store
    and sum. The most where none does."""
    enough = [s for s in values if programs(spec, tokens) * s >= FILLED * arch.sm_count]
    return min(enough) if enough else max(values)


def default(spec: Spec, tokens: int, arch: Arch) -> Config:
    """``fwd_ws``'s preferred tiles and ring, split so that every SM has a program; fewer shares
    where d_ff has too few tiles for that many."""
    want = default_split(spec, tokens, arch, SPLIT.values)
    splits = sorted((s for s in SPLIT.values if s <= want), reverse=True)
    candidates = ({"block_f": bf, "num_stages": stages, "split": split}
                  for bf, stages in fwd_ws.PREFERRED_TILES for split in splits)
    return hopper.default("fwd_ws_split", spec, "fwd", reject, arch, candidates, hopper.SPLIT_HEAD_DIMS)


SPLIT = Param("split", (2, 3, 4, 8), log2=False,
              help="programs sharing a head's d_ff (program axis 2); the last one sums their partials")

FWD_WS_SPLIT = KernelKind(
    name="fwd_ws_split",
    template="fwd_ws.py.jinja",
    description="forward core for Hopper at 256-4096 tokens: fwd_ws with d_ff split between programs, Gluon",
    role=FORWARD,
    params=(*fwd_ws.FWD_WS.params, SPLIT),
    reject_fn=reject,
    default_fn=default,
    flops=fwd.flops,
    needs=hopper.NEEDS,
    min_tokens=MIN_TOKENS,
    max_tokens=MAX_TOKENS,
    fallback="fwd",
)
