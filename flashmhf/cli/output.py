"""Printing data: tables and lines whose text comes from cache files, configs kept whole.

Text read from a cache file is data: it is never parsed as rich markup (a ``[/bad]`` would crash,
a ``[link=…]`` would become a link) and its control characters are shown as escapes, never sent to
the terminal. Every command that prints stored text prints it through here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import click
from rich.console import Console
from rich.table import Table

from flashmhf.cache.notice import plain
from flashmhf.codegen import Config

# Wide enough for any one "name=value," item of a config, so a wrapped config breaks between items.
CONFIG_ITEM_WIDTH = 16


def data_console(*, stderr: bool = False) -> Console:
    """A console that prints text as text (no markup, no highlighting); 160 columns in a pipe."""
    width = None if (sys.stderr if stderr else sys.stdout).isatty() else 160
    return Console(markup=False, highlight=False, stderr=stderr, width=width)


def config_text(config: Config) -> str:
    """``block_m=128, block_f=64, …``: items separated by spaces, so a table wraps between items."""
    return ", ".join(f"{plain(str(k))}={plain(str(v))}" for k, v in config.items())


def data_table(*headers: str, title: str | None = None, config_columns: Iterable[str] = ()) -> Table:
    """A table whose cells are plain text; the ``config_columns`` wrap between config items and are
    never cut short."""
    table = Table(title=plain(title) if title else None)
    wide = set(config_columns)
    for h in headers:
        if h in wide:
            table.add_column(h, min_width=CONFIG_ITEM_WIDTH, overflow="fold", ratio=1)
        else:
            table.add_column(h)
    return table


def add_row(table: Table, *cells: object) -> None:
    table.add_row(*(plain("" if c is None else str(c)) for c in cells))


def echo(text: str, *, err: bool = False) -> None:
    """click.echo of a line that may hold stored text."""
    click.echo(plain(text), err=err)


def files_table(reports: Iterable) -> Table:
    """The cache files in lookup order with their state and counts (`cache ls`, `doctor`);
    ``reports``: :class:`flashmhf.cache.summary.FileReport` items."""
    table = data_table("#", "role", "path", "state", "keys", "trials", "best", title="cache files in lookup order")
    for i, r in enumerate(reports, 1):
        c = r.counts or {}
        add_row(table, i, r.role, r.path, r.state, *(c.get(n, "") for n in ("keys", "trials", "best")))
    return table
