"""What a GPU model's shipped cache holds for a layer shape: the kinds the runtime runs, in the phases
``scripts/tune_preset.sh`` tunes them, each at the token buckets its kinds serve.

    python -m flashmhf.tuner.phases PRESET     # one line per phase: NAME KINDS TOKENS TRIALS

``tests/test_shipped_cache.py`` checks the shipped H200 cache against this list.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flashmhf.cache.buckets import TUNED_BUCKETS as BUCKETS
from flashmhf.codegen import Spec, get_kind
from flashmhf.codegen.arch import Arch
from flashmhf.tuner.session import tunable_jobs
from flashmhf_runtime.presets import Preset, get_preset

LAYER = "LAYER"  # stands for the layer's norm/router kind: "norm_router" with a head norm, else "router"


@dataclass(frozen=True)
class Phase:
    name: str
    kinds: tuple[str, ...]  # with LAYER for the preset's norm/router kind
    buckets: tuple[int, ...]
    trials: int


PHASES = (
    Phase("forward-family", ("fwd", "fwd_ws", "fwd_ws_split", LAYER), BUCKETS, 16),
    Phase("one-kernel-forward", (LAYER + "_core",), tuple(b for b in BUCKETS if b <= 1024), 16),
    Phase("backward-families", ("bwd_dq", "bwd_dq_ws", "bwd_dkuv", "bwd_dkuv_ws", LAYER + "_bwd"),
          tuple(b for b in BUCKETS if b >= 1024), 12),
)


def _spec(kind: str, preset: Preset, dtype: str) -> Spec:
    return Spec(kind, *preset.shape, dtype)


def phase_kinds(phase: Phase, preset: Preset, dtype: str = "bf16") -> list[str]:
    """The phase's kinds that take the preset's shape in ``dtype`` (e.g. the Gluon kinds take 16-bit
    inputs only), LAYER replaced by the preset's norm/router kind."""
    layer = "norm_router" if preset.head_norm else "router"
    names = [k.replace(LAYER, layer) for k in phase.kinds]
    return [k for k in names if get_kind(k).shape_reason(_spec(k, preset, dtype)) is None]


def jobs(preset: Preset, dtype: str, arch: Arch) -> list[tuple[Spec, int]]:
    """Every (spec, bucket) the phases tune for the preset in ``dtype`` on ``arch``: the keys a
    complete cache of that GPU model holds."""
    found: list[tuple[Spec, int]] = []
    for phase in PHASES:
        specs = [_spec(k, preset, dtype) for k in phase_kinds(phase, preset, dtype)]
        found += tunable_jobs(specs, phase.buckets, arch)
    return found


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m flashmhf.tuner.phases PRESET")
    try:
        preset = get_preset(args[0])
    except ValueError as exc:
        sys.exit(str(exc))
    for phase in PHASES:
        print(phase.name, ",".join(phase_kinds(phase, preset)), ",".join(map(str, phase.buckets)), phase.trials)


if __name__ == "__main__":
    main()
