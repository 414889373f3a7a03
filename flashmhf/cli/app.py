"""The click group; every expected failure becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import click


class FriendlyGroup(click.Group):
    """Turns ValueError (bad specs, configs, cache files) into a one-line error without traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashmhf")
def main() -> None:
    """FlashMHF toolchain: generate, tune, cache and benchmark FlashMHF kernels."""


def _register() -> None:
    from flashmhf.cli import bench_cmd, cache_cmd, doctor_cmd, presets_cmd, show_cmd, tune_cmd

    main.add_command(presets_cmd.presets)
    main.add_command(show_cmd.show)
    main.add_command(tune_cmd.tune)
    main.add_command(cache_cmd.cache)
    main.add_command(bench_cmd.bench)
    main.add_command(doctor_cmd.doctor)


_register()
