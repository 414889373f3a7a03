"""`flashmhf cache ls|show|export|import|merge|verify|rm`: manage tuning-cache files."""

from __future__ import annotations

import functools
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from flashmhf.cache import portable
from flashmhf.cache.buckets import token_bucket
from flashmhf.cache.device import normalise_device_name
from flashmhf.cache.notice import plain
from flashmhf.cache.paths import cache_files_in_effect, user_cache_path
from flashmhf.cache.store import CacheFileError, ResultKey, Trial, TuningCache
from flashmhf.cache.summary import files_report, staleness
from flashmhf.cli.files import check_new_output, write_new
from flashmhf.cli.output import add_row, config_text, data_console, data_table, echo, files_table
from flashmhf.cli.spec_options import kind_choices, shape_from_options, shape_options
from flashmhf.codegen import DTYPES

SQLITE_MAGIC = b"SQLite format 3\x00"


def _cache_option(help_text: str) -> Callable:
    return click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path),
                        help=f"{help_text} (default: the user cache file)")


def filter_options(f: Callable) -> Callable:
    """--device, --preset/shape, --kind, --dtype, --tokens; collected into one ``filters`` dict of key fields."""
    options = [
        click.option("--device", help="device name, e.g. nvidia-h200 (normalised: 'NVIDIA H200' works too)"),
        click.option("--kind", type=click.Choice(kind_choices()), help="kernel kind"),
        click.option("--dtype", type=click.Choice(DTYPES), help="data type"),
        click.option("--tokens", type=int, help="token count (matches its power-of-two bucket)"),
    ]
    for option in reversed(options):
        f = option(f)
    f = shape_options(f)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        shape = {k: kwargs.pop(k) for k in ("preset", "d_model", "heads", "kv_heads", "d_ff", "experts")}
        device, kind, dtype, tokens = (kwargs.pop(k) for k in ("device", "kind", "dtype", "tokens"))
        filters: dict[str, Any] = {"kind": kind, "dtype": dtype}
        if device:
            filters["device"] = normalise_device_name(device)
        if tokens is not None:
            if tokens <= 0:
                raise ValueError(f"--tokens must be positive, got {tokens}")
            filters["bucket"] = token_bucket(tokens)
        if any(v is not None for k, v in shape.items() if k != "kv_heads"):
            h, h_kv, d_h, e, d_e, _ = shape_from_options(**shape)
            filters.update(n_heads=h, head_dim=d_h, n_experts=e, expert_dim=d_e)
            if shape["kv_heads"] is not None:
                filters["n_kv_heads"] = h_kv
        elif shape["kv_heads"] is not None:
            filters["n_kv_heads"] = shape["kv_heads"]
        return f(*args, filters={k: v for k, v in filters.items() if v is not None}, **kwargs)

    return wrapper


def _open(path: Path | None, *, readonly: bool) -> TuningCache:
    return TuningCache(path or user_cache_path(), readonly=readonly)


def _shape(key: ResultKey) -> str:
    s = key.spec
    kv = f"/{s.n_kv_heads}" if s.n_kv_heads != s.n_heads else ""
    return f"H{s.n_heads}{kv} d_h{s.head_dim} E{s.n_experts}x{s.expert_dim}"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _stale(key: ResultKey) -> str | None:
    """Why the installed templates cannot use this key (other Triton versions are not stale: another install may)."""
    return staleness(key, key.triton_version)


class _CacheGroup(click.Group):
    """A file damaged beyond its header fails on first read: one line, like every other bad file."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except sqlite3.DatabaseError as exc:
            raise click.ClickException(f"cache file unreadable ({exc}); `flashmhf cache verify` checks it") from None


@click.group(cls=_CacheGroup)
def cache() -> None:
    """Manage tuning-cache files (SQLite): list, show, export/import, merge, verify, remove."""


@cache.command("ls")
@_cache_option("list the keys of this file")
@filter_options
def ls(cache_path: Path | None, filters: dict) -> None:
    """Without --cache: the files in effect in lookup order; with --cache: that file's keys."""
    console = data_console()
    if cache_path is None:
        console.print(files_table(files_report(**filters)))
        return
    with _open(cache_path, readonly=True) as c:
        bests = dict(c.best_rows(**filters))
        counts = {k: len(c.trials(k)) for k in c.keys(**filters)}
    # Eleven columns leave no room for a whole config: the best configs follow the table, one a line.
    table = data_table("#", "kind", "shape", "dtype", "bucket", "device", "sm", "triton", "template", "trials",
                       "best ms", title=str(cache_path))
    configs = []
    for i, (key, n) in enumerate(counts.items(), 1):
        best = bests.get(key)
        stale = _stale(key)
        add_row(table, i, key.spec.kind, _shape(key), key.spec.dtype, key.bucket, key.device, key.capability,
                key.triton_version, key.template_hash + (" (stale)" if stale else ""), n,
                _ms(best.median_ms) if best else "")
        configs.append(f"#{i} best config: {_config(best) if best else '-'}")
    console.print(table)
    for line in configs:
        echo(line)
    if not counts:
        click.echo("no matching keys")


def _config(trial: Trial) -> str:
    return config_text(trial.config) if isinstance(trial.config, dict) else repr(trial.config)


def _trial_row(trial: Trial, is_best: bool) -> list[str]:
    error = (trial.error or "").splitlines()[0][:60] if trial.error else ""
    return ["*" if is_best else "", _config(trial), trial.status, _ms(trial.median_ms),
            _ms(trial.p20_ms), _ms(trial.p80_ms), trial.host, trial.recorded_at[:19], error]


@cache.command()
@_cache_option("read this file")
@filter_options
@click.option("--limit", type=int, default=20, show_default=True, help="trials shown per key (0: all)")
@click.option("--source", "with_source", is_flag=True, help="also print the stored kernel source (inspection only)")
def show(cache_path: Path | None, filters: dict, limit: int, with_source: bool) -> None:
    """Trials of the matching keys, fastest first (the best one marked *)."""
    console = data_console()
    with _open(cache_path, readonly=True) as c:
        keys = c.keys(**filters)
        if not keys:
            echo(f"no matching keys in {c.path}")
            return
        for key in keys:
            trials = c.trials(key)
            best = c.best(key)
            trials.sort(key=lambda t: (not t.ok, t.median_ms if t.ok else 0.0, t.recorded_at))
            shown = trials if limit <= 0 else trials[:limit]
            stale = _stale(key)
            title = (f"{key.label()} | Triton {key.triton_version} | template {key.template_hash}"
                     f"{' (stale: ' + stale + ')' if stale else ''} | space {key.space_hash}")
            table = data_table("best", "config", "status", "median ms", "p20 ms", "p80 ms", "host", "recorded (UTC)",
                               "error", title=title, config_columns=["config"])
            for t in shown:
                add_row(table, *_trial_row(t, best is not None and t.id == best.id))
            console.print(table)
            if len(shown) < len(trials):
                click.echo(f"({len(trials) - len(shown)} more trials; --limit 0 shows all)")
            if with_source:
                text = c.kernel_source(key.spec, key.template_hash)
                echo(text if text else f"# no stored source for {key.spec.label()} template {key.template_hash}")


@cache.command()
@_cache_option("export from this file")
@filter_options
@click.option("-o", "--output", default="-", show_default=True,
              help="JSON file to write ('-': stdout); a name ending in .sqlite writes a new single-file cache")
@click.option("--force", is_flag=True, help="replace an existing output file")
def export(cache_path: Path | None, filters: dict, output: str, force: bool) -> None:
    """Export the matching keys with all their trials as JSON (portable and reviewable: contribute results).

    With -o NAME.sqlite: a new self-contained cache file instead (e.g. one to ship for a GPU model).
    An existing output file is replaced only with --force; a symbolic link is never written through.
    """
    dest = None if output == "-" else Path(output).expanduser()
    if dest is not None:
        check_new_output(dest, force=force)
    with _open(cache_path, readonly=True) as c:
        n_keys = len(c.keys(**filters))
        if dest is None:
            n = portable.export_json(c, sys.stdout, **filters)
        elif dest.name.endswith(".sqlite"):
            counted: list[int] = []
            write_new(dest, lambda tmp: counted.append(c.copy_to(tmp, **filters)), force=force)
            n = counted[0]
        else:
            text, n = portable.export_text(c, **filters)
            write_new(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)
    echo(f"exported {n} trials of {n_keys} keys from {c.path}" + ("" if dest is None else f" to {dest}"), err=True)


def _read_import(name: str) -> list:
    """The validated rows of one export (a path, or '-' for stdin)."""
    if name == "-":
        return portable.read_export(sys.stdin)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as fb:
        if fb.read(16) == SQLITE_MAGIC:
            raise ValueError(f"{path}: an SQLite cache file, not a JSON export: use `flashmhf cache merge`")
    return portable.read_export(path)


@cache.command("import")
@click.argument("files", nargs=-1, required=True)
@_cache_option("import into this file (created if needed)")
def import_(files: tuple[str, ...], cache_path: Path | None) -> None:
    """Add the trials of exported JSON FILES ('-': stdin); bests are recomputed, duplicates skipped.

    Every file is read and checked before anything is written: a bad file imports nothing."""
    documents = [(name, _read_import(name)) for name in files]
    with _open(cache_path, readonly=False) as c:
        for name, rows in documents:
            n = c.add_trials(rows)
            echo(f"{name}: {n} new trials imported into {c.path}")


@cache.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@_cache_option("merge into this file (created if needed)")
def merge(sources: tuple[Path, ...], cache_path: Path | None) -> None:
    """Copy every valid trial of the SOURCES cache files into one file (dedup, bests recomputed).

    Rows that could never be used (bad keys, configs outside the kind's values, bad times) are
    skipped and reported."""
    target = (cache_path or user_cache_path()).expanduser()
    for src in sources:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such cache file")
        if target.exists() and src.resolve() == target.resolve():
            raise ValueError(f"{src}: cannot merge a cache file into itself")
    with _open(cache_path, readonly=False) as c:
        for src in sources:
            n, skipped = c.merge_from(src)
            echo(f"{src}: {n} new trials merged into {c.path}")
            if skipped:
                echo(f"{src}: {len(skipped)} unusable row(s) skipped, e.g. {skipped[0]}", err=True)


@cache.command()
@click.option("--cache", "cache_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="file to verify (repeatable; default: the user cache file)")
@click.option("--all", "all_files", is_flag=True, help="verify every existing file in effect")
def verify(cache_paths: tuple[Path, ...], all_files: bool) -> None:
    """Check files: schema, integrity, best rows vs trials, configs; stale results are warnings.

    Every file is checked and reported, also after a bad one."""
    paths = list(cache_paths)
    if all_files:
        paths += [p for p, _ in cache_files_in_effect() if p.is_file()]
    paths = paths or [user_cache_path()]
    failed = []
    for path in paths:
        try:
            with TuningCache(path, readonly=True) as c:
                errors, warnings = c.check()
                counts = c.counts() if not errors else None
        except (CacheFileError, OSError) as exc:
            errors, warnings, counts = [str(exc).removeprefix(f"{path}: ")], [], None
        for e in errors:
            echo(f"{path}: error: {e}")
        for w in warnings:
            echo(f"{path}: warning: {w}")
        if errors:
            failed.append(f"{path}: {len(errors)} error(s)")
        elif counts is not None:
            echo(f"{path}: ok ({counts['keys']} keys, {counts['trials']} trials, {counts['best']} best)")
    if failed:
        raise click.ClickException(plain("; ".join(failed)))


@cache.command()
@_cache_option("remove from this file")
@filter_options
@click.option("--stale", is_flag=True, help="only keys whose template hash differs from the installed templates")
@click.option("--all", "everything", is_flag=True, help="allow removing every key (no filter given)")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
def rm(cache_path: Path | None, filters: dict, stale: bool, everything: bool, yes: bool) -> None:
    """Remove the matching keys with all their trials."""
    if not filters and not stale and not everything:
        raise click.UsageError("give a filter (--device, --preset, --kind, --dtype, --tokens, --stale) or --all")
    path = cache_path or user_cache_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such cache file")
    with TuningCache(path) as c:
        keys = [k for k in c.keys(**filters) if not stale or _stale(k)]
        n_trials = sum(len(c.trials(k)) for k in keys)
        if not keys:
            echo(f"no matching keys in {path}")
            return
        if not yes:
            click.confirm(plain(f"remove {len(keys)} keys ({n_trials} trials) from {path}?"), abort=True)
        n = c.delete_keys(keys)
    echo(f"removed {len(keys)} keys ({n} trials) from {path}")

