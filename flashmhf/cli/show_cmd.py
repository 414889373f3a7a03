"""`flashmhf show`: print the generated Triton source for a shape."""

from __future__ import annotations

import json

import click

from flashmhf.cli.spec_options import dtype_option, kind_choices, shape_options, spec_from_options, with_shape
from flashmhf.codegen import SpecError, format_config, get_kind, render


@click.command()
@shape_options
@click.option("--kind", type=click.Choice(kind_choices()), default="fwd", show_default=True, help="kernel kind")
@dtype_option()
@click.option("--config", "config_json", help='a config to check against the spec, e.g. \'{"block_m": 128, ...}\'')
@click.option("--tokens", type=int, help="token count for the default config shown in the header comment")
@with_shape
def show(shape: dict, kind: str, dtype: str, config_json: str | None, tokens: int | None) -> None:
    """Print the generated Triton source of one kernel kind for a layer shape."""
    spec = spec_from_options(kind, dtype, **shape)
    source = render(spec)
    k = get_kind(kind)
    if config_json:
        try:
            config = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise SpecError(f"--config is not valid JSON: {exc.msg}") from None
        if not isinstance(config, dict):
            raise SpecError("--config must be a JSON object of config values")
        k.check_config(spec, config, tokens)
        note = f"# launch config (checked): {format_config(config)}\n"
    else:
        note = f"# default launch config at {tokens or 1} tokens: {format_config(k.default(spec, tokens or 1))}\n"
    click.echo(note + source, nl=False)
