"""Which kernel runs here: the kinds of each role, in the order the runtime prefers them.

A kind declares its role, what it needs of the architecture, the token counts it runs at and its
fallback (``KernelKind``); the registry (``flashmhf.codegen.kinds.KINDS``) lists them. For a role,
every kind is tried before the kinds it falls back to, and the first that can run the shape on the
architecture at the token count runs. A role's last kind needs nothing of the architecture and takes
every shape the code generator accepts (tests hold the registry to that); where even it cannot serve
a shape the caller runs the reference. Where several kinds can run, the runtime takes the one its
tuning cache measured fastest (flashmhf_runtime.op.kind_for); preference decides only without times.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import replace
from functools import cache

from flashmhf.codegen.arch import Arch
from flashmhf.codegen.kinds import KINDS, get_kind
from flashmhf.codegen.kinds.base import KernelKind, Role
from flashmhf.codegen.spec import Spec


def roles() -> list[Role]:
    """Every role some kind of the registry plays, in registry order."""
    return list(dict.fromkeys(k.role for k in KINDS.values()))


def role(name: str) -> Role:
    found = [r for r in roles() if r.name == name]
    if not found:
        raise ValueError(f"role must be one of {', '.join(r.name for r in roles())}, got {name!r}")
    return found[0]


def runtime_roles() -> list[Role]:
    """The roles the runtime runs a kind for (the op: forward, dq, dkuv)."""
    return [r for r in roles() if r.runs]


def kinds_of(role_: Role) -> list[KernelKind]:
    """The kinds of ``role_`` in order of preference: every kind before the kinds it falls back to
    (farther from the end of its chain first; registry order among equals)."""
    members = [k for k in KINDS.values() if k.role == role_]
    return sorted(members, key=lambda k: -_hops(k))


def _hops(kind: KernelKind) -> int:
    """Fallbacks between ``kind`` and the end of its chain."""
    seen = {kind.name}
    while kind.fallback and kind.fallback not in seen:
        seen.add(kind.fallback)
        kind = get_kind(kind.fallback)
    return len(seen) - 1


def why_not(kind: KernelKind, shape: Spec, tokens: int | None, arch: Arch) -> str | None:
    """Why ``kind`` does not run ``shape``'s layer shape and dtype (its kind field is ignored) at
    ``tokens`` (None: at some token count) on ``arch``; None when it does."""
    return (kind.token_reason(tokens) or kind.unavailable(arch)
            or kind.shape_reason(replace(shape, kind=kind.name), arch))


@cache
def runnable(role_: Role, shape: Spec, arch: Arch) -> tuple[tuple[str, int, float], ...]:
    """(kind, minimum tokens, maximum tokens) of every kind of ``role_`` that can run ``shape`` on
    ``arch``, in order of preference. Memoised: this is what the runtime asks on every call."""
    return tuple((k.name, k.min_tokens, k.max_tokens or math.inf) for k in kinds_of(role_)
                 if why_not(k, shape, None, arch) is None)


def candidates(role_: Role, shape: Spec, tokens: int, arch: Arch, disabled: Collection[str] = ()) -> tuple[str, ...]:
    """Every kind that can run ``role_`` for ``shape`` (its layer shape and dtype) at ``tokens`` on
    ``arch`` and is not ``disabled``, in order of preference (the runtime may pick a later one that
    measured faster on the device)."""
    found = runnable(role_, shape if shape.kind == "" else replace(shape, kind=""), arch)
    return tuple(name for name, low, high in found if low <= tokens <= high and name not in disabled)


def choose(role_: Role, shape: Spec, tokens: int, arch: Arch, disabled: Collection[str] = ()) -> str | None:
    """The kind that runs ``role_`` for ``shape`` at ``tokens`` on ``arch`` by preference alone: the
    first of :func:`candidates`; None when none can (the caller runs the reference)."""
    found = candidates(role_, shape, tokens, arch, disabled)
    return found[0] if found else None


def reason(role_: Role, shape: Spec, arch: Arch) -> str:
    """Why no kind of ``role_`` runs ``shape`` on ``arch``: the reason of the role's last resort, the
    kind that needs least."""
    last = kinds_of(role_)[-1]
    return why_not(last, shape, None, arch) or f"{last.name} is disabled"


def default_kinds() -> list[str]:
    """The kinds ``flashmhf tune`` tunes unless told otherwise: every kind of a role the runtime runs."""
    return [k.name for r in runtime_roles() for k in kinds_of(r)]
