"""`flashmhf tune`: search kernel configs on this machine's GPU and store the winners in a cache."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flashmhf.cli.output import add_row, config_text, data_console, data_table
from flashmhf.cli.spec_options import dtype_option, shape_from_options, shape_options, with_shape
from flashmhf.codegen import DTYPES, KINDS, Spec, SpecError, registry
from flashmhf.codegen.spec import kernel_dims

GPU_TRIALS = 48
DEFAULT_KINDS = tuple(registry.default_kinds())  # every kind of a role the runtime runs
INTERPRETER_TRIALS = 8  # the interpreter is slow: enough to exercise the pipeline end to end


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SpecError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SpecError(f"{what} must list positive integers, got {text!r}")
    return values


def _choices(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SpecError(f"{what} must be a comma list of {', '.join(allowed)}, got {text!r}")
    return items


def _named_kinds(text: str | None) -> list[str] | None:
    """The kinds named by --kind (None: the defaults); one this machine cannot run is an error."""
    from flashmhf.cache.device import device_arch
    from flashmhf.codegen import get_kind

    if text is None:
        return None
    kinds = _choices(text, list(KINDS), "--kind")
    arch = device_arch()
    for name in kinds:
        why = get_kind(name).unavailable(arch)
        if why:
            raise SpecError(f"--kind {name}: this machine cannot run it ({why})")
    return kinds


def _default_kinds(console: Console) -> list[str]:
    """The default kinds, without those this machine cannot run (said, one line each)."""
    from flashmhf.cache.device import device_arch
    from flashmhf.codegen import get_kind

    arch = device_arch()
    kinds = []
    for name in DEFAULT_KINDS:
        why = get_kind(name).unavailable(arch)
        if why:
            console.print(f"[dim]Skipping {name}: {why}.[/]")
        else:
            kinds.append(name)
    return kinds


def _fitting(specs: list[Spec], named: bool, console: Console) -> list[Spec]:
    """Drop the specs whose kind cannot take the layer shape (an error when the kind was named)."""
    from flashmhf.cache.device import device_arch
    from flashmhf.codegen import get_kind

    arch = device_arch()
    kept = []
    for s in specs:
        why = get_kind(s.kind).shape_reason(s, arch)
        if why and named:
            raise SpecError(why)
        if why:
            console.print(f"[dim]Skipping {s.kind} for {s.dtype}: {why}.[/]")
        else:
            kept.append(s)
    return kept


def _buckets(tokens: tuple[int, ...]) -> tuple[int, ...]:
    from flashmhf.cache.buckets import token_bucket

    return tuple(sorted({token_bucket(t) for t in tokens}))


def _use_interpreter_if_no_gpu(console: Console) -> bool:
    """No CUDA GPU: run the same pipeline under Triton's CPU interpreter, and say so."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        console.print(
            "[bold yellow]No CUDA GPU: tuning a miniature of this layer under the Triton CPU interpreter.[/] "
            "Timings are interpreter wall-clock times, NOT GPU timings; results are stored under the device "
            "name 'triton-interpreter-cpu', which no GPU ever matches."
        )
        return True
    return False


@click.command()
@shape_options
@click.option("--tokens", default=None, help="comma list of token counts (rounded up to power-of-two buckets) "
              "[default: 1,16,64,256,1024,4096,16384; 1,16 without a GPU]")
@click.option("--kind", "kinds", default=None,
              help=f"comma list of kernel kinds ({', '.join(KINDS)}) [default: the kinds of the roles the "
              "runtime runs, without those this machine cannot run]")
@dtype_option(multiple=True)
@click.option("--trials", type=int, default=None,
              help="distinct configs measured per (kind, bucket), earlier runs included [default: 48; 8 without a GPU]")
@click.option("--time-budget", type=float, default=None,
              help="seconds for the whole run, shared across buckets (each still gets its default measured)")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="cache file to write [default: the user cache file]")
@click.option("--storage", default=None, help="Optuna storage URL (sqlite:///…, postgresql://…, journal:PATH) "
              "[default: a journal file next to the cache]")
@click.option("--gpus", default=None, help="'all' or a comma list of GPU indices: one worker process per GPU")
@click.option("--worker", is_flag=True, help="join the studies in --storage as one more worker (another host)")
@click.option("--seed", type=int, default=None, help="seed of the sampler (reproducible searches)")
@click.option("--no-isolate", is_flag=True, help="measure in this process (no crash containment; debugging)")
@with_shape
def tune(shape: dict, tokens: str | None, kinds: str, dtype: str, trials: int | None, time_budget: float | None,
         cache_path: Path | None, storage: str | None, gpus: str | None, worker: bool, seed: int | None,
         no_isolate: bool) -> None:
    """Tune kernel configs for a layer shape on this machine and store them in a cache file.

    Each (kind, dtype, token bucket) gets an Optuna study: seeded with the default and neighbouring
    results, pruned by a resource model, every candidate checked against the float64 reference
    before it is timed. Interrupted runs resume; `--gpus` and `--worker` share studies across GPUs
    and hosts.
    """
    console = Console(stderr=True, width=max(120, Console(stderr=True).width))
    from flashmhf.cache.paths import user_cache_path
    from flashmhf.cache.store import TuningCache
    from flashmhf.codegen import plan

    # Every argument is checked before anything is printed or started.
    if trials is not None and trials <= 0:
        raise SpecError(f"--trials must be positive, got {trials}")
    if time_budget is not None and time_budget <= 0:
        raise SpecError(f"--time-budget must be positive seconds, got {time_budget}")
    if worker and not storage:
        raise SpecError("--worker joins existing studies: give the shared --storage URL too")
    h, h_kv, d_h, e, d_e, label = shape_from_options(**shape)
    if kernel_dims(d_h, d_e) != (d_h, d_e):
        d_h, d_e = kernel_dims(d_h, d_e)
        console.print(f"[dim]The layer runs on kernels for d_h={d_h}, d_e={d_e} (its tensors zero-padded): "
                      "tuning those.[/]")
    dtypes = _choices(dtype, DTYPES, "--dtype")
    token_counts = _int_list(tokens, "--tokens") if tokens else None
    named = _named_kinds(kinds)
    for k in named or DEFAULT_KINDS:
        for dt in dtypes:
            plan(Spec(k, h, h_kv, d_h, e, d_e, dt))
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise click.ClickException("tuning needs optuna: pip install 'flashmhf[tune]'") from None
    cache_path = cache_path or user_cache_path()
    TuningCache(cache_path).close()  # a file that cannot be used or written: said now, not after a measurement
    from flashmhf.tuner import session

    kind_list = named if named is not None else _default_kinds(console)
    specs = [Spec(k, h, h_kv, d_h, e, d_e, dt) for k in kind_list for dt in dtypes]
    specs = _fitting(specs, named is not None, console)
    if gpus:
        from flashmhf.tuner import multi

        failed = multi.run_on_gpus(gpus, cache_path=cache_path, storage=storage, console=console)
        if failed:
            raise click.ClickException(f"{failed} worker(s) failed; the cache holds what the others measured")
        _print_cache_results(specs, cache_path)
        return
    interpreter = _use_interpreter_if_no_gpu(console)
    if interpreter:
        if "bf16" in dtypes:
            console.print("[yellow]Triton 3.6's interpreter cannot compute bf16 (it multiplies raw bit patterns): "
                          "the miniature is tuned in fp16 instead.[/]")
            specs = [replace(s, dtype="fp16") if s.dtype == "bf16" else s for s in specs]
            specs = list(dict.fromkeys(specs))
        specs = [session.miniature(s) for s in specs]
        label += " (miniature: " + specs[0].label().split(" ", 1)[1] + ")"
    trials = trials or (INTERPRETER_TRIALS if interpreter else GPU_TRIALS)
    buckets = _buckets(token_counts) if token_counts else (
        session.INTERPRETER_BUCKETS if interpreter else session.DEFAULT_BUCKETS)
    request = session.Request(
        specs=specs, buckets=buckets, trials=trials, time_budget_s=time_budget, cache_path=cache_path,
        storage_url=storage, seed=seed, shared=worker or bool(os.environ.get("FLASHMHF_TUNE_SHARED")),
        isolate=not no_isolate,
    )
    used_dtypes = list(dict.fromkeys(s.dtype for s in specs))
    console.print(f"Tuning {label}: kinds {', '.join(kind_list)}, dtypes {', '.join(used_dtypes)}, "
                  f"token buckets {', '.join(map(str, buckets))}, {trials} configs each → {cache_path}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[best]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int | None] = {}

        def progress(job: str, done: int, goal: int, best_ms: float | None, tf: float | None) -> None:
            if job not in tasks and done >= goal:
                console.print(f"{job}: already tuned ({done} results), nothing to do", markup=False)
                tasks[job] = None
            if job not in tasks:
                tasks[job] = bar.add_task(job, total=goal, best="")
            if tasks[job] is None:
                return
            best = f"best {best_ms:.4f} ms" + (f" ({tf:.0f} TFLOP/s)" if tf and not interpreter else "") \
                if best_ms else ""
            bar.update(tasks[job], completed=done, total=goal, best=best)

        results = session.run(request, progress, say=lambda line: console.print(line, markup=False))
    _print_results(results, interpreter)


def _print_cache_results(specs: list[Spec], cache_path: Path) -> None:
    """After several workers: the best per key for these specs on this device, read from the cache."""
    from flashmhf.cache.device import device_info
    from flashmhf.cache.store import TuningCache

    dev = device_info()
    table = data_table("kind", "dtype", "T", "best config", "ms", "trials", config_columns=["best config"])
    with TuningCache(cache_path, readonly=True) as cache:
        for s in specs:
            for key, best in cache.best_rows(**s.to_dict(), device=dev.name):
                add_row(table, s.kind, s.dtype, key.bucket, config_text(best.config), f"{best.median_ms:.4f}",
                        len(cache.trials(key)))
    data_console().print(table)


def _print_results(results, interpreter: bool) -> None:
    from flashmhf.codegen import get_kind

    unit = "ms (interpreter wall)" if interpreter else "ms"
    table = data_table("kind", "dtype", "T", "best config", unit, "TFLOP/s", "× default", "measured", "space",
                       config_columns=["best config"])
    for r in results:
        k, s = r.key, r.key.spec
        if r.best is None:
            add_row(table, s.kind, s.dtype, k.bucket, "no config passed", "", "", "", r.measured_total, r.space_size)
            continue
        flop = get_kind(s.kind).flops(s, k.bucket)
        tf = "—" if interpreter else f"{flop / (r.best.median_ms * 1e-3) / 1e12:.0f}"
        speed = f"{r.speedup_over_default:.2f}" if r.speedup_over_default else "—"
        add_row(table, s.kind, s.dtype, k.bucket, config_text(r.best.config), f"{r.best.median_ms:.4f}", tf,
                speed, r.measured_total, str(r.space_size) + (" (all)" if r.brute_force else ""))
    data_console().print(table)
