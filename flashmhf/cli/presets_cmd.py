"""`flashmhf presets`: the named layer shapes."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from flashmhf_runtime.presets import PRESETS


@click.command()
def presets() -> None:
    """List the preset layer shapes (paper Table 4 and the authors' public configs)."""
    table = Table("preset", "d_model", "H", "d_h", "d_ff", "E", "d_e", "head norm", "source")
    for p in PRESETS.values():
        table.add_row(p.name, *(str(x) for x in (p.d_model, p.n_heads, p.head_dim, p.d_ff, p.n_experts,
                                                  p.expert_dim)), "yes" if p.head_norm else "no", p.source)
    Console(width=120).print(table)
