"""`flashmhf show`: print the generated Triton source for a shape."""

from __future__ import annotations

import json
from dataclasses import replace

import click

from flashmhf.cli.spec_options import dtype_option, kind_choices, shape_options, spec_from_options, with_shape
from flashmhf.codegen import SpecError, format_config, get_kind, render
from flashmhf.codegen.arch import arch_for_capability
from flashmhf.codegen.spec import kernel_dims


@click.command()
@shape_options
@click.option("--kind", type=click.Choice(kind_choices()), default="fwd", show_default=True, help="kernel kind")
@dtype_option()
@click.option("--config", "config_json", help='a config to check against the spec, e.g. \'{"block_m": 128, ...}\'')
@click.option("--tokens", type=int, help="token count for the default config shown in the header comment")
@click.option("--resources", is_flag=True,
              help="instead of the source: compile for a GPU (no GPU needed) and report registers, spills, "
                   "shared memory, tensor-core instructions and special-function (MUFU) instructions per kernel")
@click.option("--capability", type=int, default=90, show_default=True,
              help="target compute capability: the default config and the checks are for it, and with "
                   "--resources the compile (90 = H100/H200, 89 = L4/L40, 86 = A10, 80 = A100)")
@with_shape
def show(shape: dict, kind: str, dtype: str, config_json: str | None, tokens: int | None, resources: bool,
         capability: int) -> None:
    """Print the generated Triton source of one kernel kind for a layer shape (or, with --resources,
    what its compiled kernels use on a GPU target)."""
    if tokens is not None and tokens <= 0:
        raise SpecError(f"--tokens must be a positive token count, got {tokens}")
    spec = spec_from_options(kind, dtype, **shape)
    padded = replace(spec, **dict(zip(("head_dim", "expert_dim"), kernel_dims(spec.head_dim, spec.expert_dim))))
    note = ""
    if padded != spec:  # the kernel that runs this layer, on zero-padded tensors
        note = (f"# the layer (d_h={spec.head_dim}, d_e={spec.expert_dim}) runs on this kernel for "
                f"d_h={padded.head_dim}, d_e={padded.expert_dim}, its tensors zero-padded\n")
        spec = padded
    source = render(spec)
    k = get_kind(kind)
    arch = arch_for_capability(capability)
    if reason := k.unavailable(arch):  # e.g. a Gluon kind for an A100: ptxas would abort on its instructions
        raise SpecError(f"{kind} does not run on {arch.name}: {reason}")
    if tokens is not None and (reason := k.token_reason(tokens)):
        raise SpecError(f"--tokens {tokens}: {kind} does not run there ({reason})")
    if config_json:
        try:
            config = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise SpecError(f"--config is not valid JSON: {exc.msg}") from None
        if not isinstance(config, dict):
            raise SpecError("--config must be a JSON object of config values")
        k.check_config(spec, config, tokens, arch)
        note += f"# launch config (checked for {arch.name}): {format_config(config)}\n"
    else:
        config = k.default(spec, tokens or 1, arch)
        note += f"# default launch config at {tokens or 1} tokens on {arch.name}: {format_config(config)}\n"
    if resources:
        _print_resources(spec, config, tokens or 4096, capability)
        return
    click.echo(note + source, nl=False)


def _print_resources(spec, config: dict, tokens: int, capability: int) -> None:
    from flashmhf.tuner.resources import kernel_resources

    click.echo(f"{spec.label()} {format_config(config)} on sm_{capability} (compiled here, ptxas -v):")
    for r in kernel_resources(spec, config, tokens=tokens, capability=capability):
        switches = ",".join(f"{name}={int(v)}" for name, v in r.constexprs.items() if isinstance(v, bool))
        spills = "?" if r.spill_bytes is None else f"{r.spill_bytes} B"
        click.echo(f"  {r.name}{' [' + switches + ']' if switches else ''}: {r.registers} registers/thread, "
                   f"spills {spills}, shared {r.shared_bytes // 1024} KiB, MMA {'; '.join(r.mma) or 'none'}")
        if r.special:
            click.echo("    special functions (PTX): " + ", ".join(f"{n} x{c}" for n, c in r.special.items()))
