"""The GPU targets the kernels are generated for: one frozen record per architecture.

A kind's constraints and defaults read their limits from here (shared memory per block, registers,
which instructions exist), so adding a GPU generation is one row of :data:`ARCHS`. At run time the
numbers a device reports about itself (``torch.cuda.get_device_properties``) replace the row's
(``device_arch`` in ``flashmhf.cache.device``, which knows about torch); the row fills in the
rest. A GPU newer than every row, or between rows, gets the nearest older row and one warning.

The Triton CPU interpreter is a row too (:data:`INTERPRETER`): it has no resource limits worth the
name, but the defaults chosen for it are the Hopper ones, so that tests on a CPU exercise the
configurations a Hopper GPU runs.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, replace
from functools import cache

# Features a kind may need (KernelKind.needs):
WGMMA = "wgmma"  # Hopper's asynchronous warp-group MMA (Triton: MMA v3)
TMA = "tma"  # the tensor memory accelerator: tensor descriptors load tiles without address registers
GLUON = "gluon"  # Triton's Gluon dialect targets this architecture (checked against the installed Triton)
FEATURES = {WGMMA: "Hopper's warp-group MMA", TMA: "TMA tensor descriptors", GLUON: "Triton's Gluon"}


@dataclass(frozen=True)
class Arch:
    """What code generation and config choice need to know of one GPU architecture."""

    name: str  # "sm_90"; "interpreter" for Triton's CPU interpreter
    capability: tuple[int, int] | None  # (major, minor); None for the interpreter
    gpus: str  # examples, for messages and docs
    smem_per_block: int  # bytes of shared memory one block may use (the opt-in maximum)
    sm_count: int  # streaming multiprocessors of the row's largest part (sizes grids; a device reports its own)
    mma: int  # Triton's MMA generation for tl.dot: 2 (mma.sync), 3 (wgmma), 5 (tcgen05)
    features: frozenset[str] = frozenset()
    regs_per_thread: int = 255
    regs_per_sm: int = 65_536
    checked: bool = True  # False: a row "on paper", not yet run on such a GPU

    @property
    def is_interpreter(self) -> bool:
        return self.capability is None

    @property
    def capability_number(self) -> int:
        """10 * major + minor (90 for sm_90), as Triton's GPUTarget takes it."""
        if self.capability is None:
            raise ValueError("the interpreter has no compute capability")
        return 10 * self.capability[0] + self.capability[1]

    def missing(self, needs: frozenset[str]) -> str | None:
        """Why a kind that needs ``needs`` cannot run on this architecture (None: it can)."""
        if needs and self.is_interpreter:
            return f"needs {_describe(needs)}: Triton's interpreter cannot run it"
        lacking = needs - self.features
        if lacking:
            return f"needs {_describe(lacking)}, which {self.label()} does not have"
        if GLUON in needs and not _triton_has_gluon():
            return "this Triton has no Gluon (triton.experimental.gluon)"
        return None

    def label(self) -> str:
        return self.name if self.is_interpreter else f"{self.name} ({self.gpus})"


def _describe(features: frozenset[str]) -> str:
    return ", ".join(f"{f} ({FEATURES.get(f, f)})" for f in sorted(features))


KIB = 1024

SM80 = Arch("sm_80", (8, 0), "A100, A30", smem_per_block=163 * KIB, sm_count=108, mma=2)
SM86 = Arch("sm_86", (8, 6), "A10, A40, RTX 30", smem_per_block=99 * KIB, sm_count=84, mma=2)
SM89 = Arch("sm_89", (8, 9), "L4, L40, RTX 40", smem_per_block=99 * KIB, sm_count=142, mma=2)
SM90 = Arch("sm_90", (9, 0), "H100, H200", smem_per_block=227 * KIB, sm_count=132, mma=3,
            features=frozenset({WGMMA, TMA, GLUON}))
SM100 = Arch("sm_100", (10, 0), "B200", smem_per_block=227 * KIB, sm_count=148, mma=5,
             features=frozenset({TMA, GLUON}), checked=False)
SM120 = Arch("sm_120", (12, 0), "RTX 50", smem_per_block=99 * KIB, sm_count=170, mma=2,
             features=frozenset({TMA, GLUON}), checked=False)
# The interpreter emulates tensor descriptors (the backward templates use them) but no GPU
# instructions; its limits are Hopper's so that CPU tests see the configs a Hopper GPU runs.
INTERPRETER = Arch("interpreter", None, "Triton CPU interpreter", smem_per_block=SM90.smem_per_block,
                   sm_count=SM90.sm_count, mma=SM90.mma, features=frozenset({TMA}))

ARCHS: dict[str, Arch] = {a.name: a for a in (SM80, SM86, SM89, SM90, SM100, SM120)}
# The architecture a kind's constraints and defaults assume when a caller names none: the one the
# shipped results were tuned on.
DEFAULT_ARCH = SM90
# The targets whose untuned defaults are checked to compile without spills (tests, `check-defaults`).
CHECKED_ARCHS = (SM80, SM86, SM89, SM90)


@cache
def _triton_has_gluon() -> bool:
    return importlib.util.find_spec("triton") is not None and \
        importlib.util.find_spec("triton.experimental.gluon") is not None


class ArchWarning(UserWarning):
    """A GPU the architecture table has no row for: the nearest older row stands in."""


def _parse(capability: tuple[int, int] | str | int) -> tuple[int, int]:
    try:
        if isinstance(capability, tuple):
            major, minor = (int(x) for x in capability)
        elif isinstance(capability, str):
            text = capability.removeprefix("sm_")
            major, minor = text.split(".") if "." in text else (text[:-1], text[-1])
            major, minor = int(major), int(minor)
        elif isinstance(capability, int) and not isinstance(capability, bool):
            major, minor = divmod(capability, 10)
        else:
            raise TypeError
        if major <= 0 or minor < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"capability: expected (major, minor), 'M.m', 'sm_Mm' or 10*M+m, got {capability!r}") from None
    return major, minor


_warned: set[tuple[int, int]] = set()


def arch_for_capability(capability: tuple[int, int] | str | int | None, *, warn: bool = True) -> Arch:
    """The row for a compute capability (``(9, 0)``, ``"9.0"``, ``"sm_90"`` or ``90``); ``None`` is
    the interpreter. A capability without a row gets the nearest older row (the oldest for one older
    than every row), with one warning per capability and process naming both."""
    if capability is None:
        return INTERPRETER
    cap = _parse(capability)
    rows = sorted(ARCHS.values(), key=lambda a: a.capability)
    exact = [a for a in rows if a.capability == cap]
    if exact:
        return exact[0]
    older = [a for a in rows if a.capability < cap]
    stand_in = older[-1] if older else rows[0]
    if warn and cap not in _warned:
        _warned.add(cap)
        warnings.warn(
            f"flashmhf: no architecture row for compute capability {cap[0]}.{cap[1]}; using {stand_in.label()}'s "
            "limits and defaults (the device's own shared memory and SM count where it reports them)",
            ArchWarning, stacklevel=2,
        )
    return stand_in


def with_device_limits(arch: Arch, *, smem_per_block: int | None = None, sm_count: int | None = None,
                       regs_per_sm: int | None = None) -> Arch:
    """``arch`` with the numbers a device reports about itself in place of the row's (None or 0:
    not reported, the row's stands)."""
    reported = {"smem_per_block": smem_per_block, "sm_count": sm_count, "regs_per_sm": regs_per_sm}
    return replace(arch, **{k: v for k, v in reported.items() if v})
