"""The options that name a layer shape, shared by show, tune and bench."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from flashmhf.codegen import DTYPES, KINDS, Spec, SpecError
from flashmhf_runtime.presets import PRESETS, get_preset


def shape_options(f: Callable) -> Callable:
    """--preset NAME | --d-model N --heads N --d-ff N --experts N [--kv-heads N]."""
    options = [
        click.option("--preset", type=click.Choice(list(PRESETS)), help="a named layer shape (see `presets`)"),
        click.option("--d-model", type=int, help="model width (H * d_h)"),
        click.option("--heads", type=int, help="number of heads H"),
        click.option("--kv-heads", type=int, help="heads of K/U/V (H_kv, divides H; default H)"),
        click.option("--d-ff", type=int, help="intermediate width per head (E * d_e)"),
        click.option("--experts", type=int, help="sub-networks per head E"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def dtype_option(default: str = "bf16", multiple: bool = False) -> Callable:
    if multiple:
        return click.option("--dtype", default=default, show_default=True, help=f"comma list of {', '.join(DTYPES)}")
    return click.option("--dtype", type=click.Choice(DTYPES), default=default, show_default=True)


def kind_choices() -> list[str]:
    return list(KINDS)


def _divide(what: str, total: int, parts: int, parts_name: str) -> int:
    if parts <= 0 or total % parts:
        raise SpecError(f"--{what} ({total}) must be divisible by --{parts_name} ({parts})")
    return total // parts


def shape_from_options(
    preset: str | None, d_model: int | None, heads: int | None, kv_heads: int | None,
    d_ff: int | None, experts: int | None,
) -> tuple[int, int, int, int, int, str]:
    """(H, H_kv, d_h, E, d_e, label) from either a preset or the four explicit sizes."""
    explicit = {"--d-model": d_model, "--heads": heads, "--d-ff": d_ff, "--experts": experts}
    if preset:
        if any(v is not None for v in explicit.values()):
            raise SpecError("give either --preset or --d-model/--heads/--d-ff/--experts, not both")
        p = get_preset(preset)
        return p.n_heads, kv_heads or p.kv_heads, p.head_dim, p.n_experts, p.expert_dim, p.name
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
        raise SpecError(
            f"give --preset NAME or all of --d-model/--heads/--d-ff/--experts (missing {', '.join(missing)})"
        )
    for name, value in explicit.items():
        if value <= 0:
            raise SpecError(f"{name} must be positive, got {value}")
    head_dim = _divide("d-model", d_model, heads, "heads")
    d_e = _divide("d-ff", d_ff, experts, "experts")
    label = f"d_model={d_model} H={heads} d_ff={d_ff} E={experts}"
    return heads, kv_heads or heads, head_dim, experts, d_e, label


def spec_from_options(kind: str, dtype: str, **shape) -> Spec:
    h, h_kv, d_h, e, d_e, _ = shape_from_options(**shape)
    return Spec(kind, h, h_kv, d_h, e, d_e, dtype)


def with_shape(f: Callable) -> Callable:
    """Collect the shape options into one ``shape`` dict argument."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        keys = ("preset", "d_model", "heads", "kv_heads", "d_ff", "experts")
        shape = {k: kwargs.pop(k) for k in keys}
        return f(*args, shape=shape, **kwargs)

    return wrapper
