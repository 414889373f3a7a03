"""PNG charts of bench results: time and TFLOP/s against tokens, one chart per shape, dtype and
direction, drawn from the rows of ``flashmhf bench --out`` (its .json), so on any machine:

    python -m flashmhf.bench.plot REPORT.json [REPORT.json ...] [--out-dir DIR]

The chart knows nothing of the bench's row types: every ``<name>_ms`` entry of a row is a series
(host times per call excepted: CPU time, not the work's), its TFLOP/s from the row's ``flop``. A new
timing column therefore shows up without a change here. matplotlib is an optional extra
(``pip install 'flashmhf[plot]'``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flashmhf.bench.results import Run, direction, read_run, report_title
from flashmhf.bench.timing import GRAPH_TOKENS

MISSING_MATPLOTLIB = "charts need matplotlib, which the base install leaves out: pip install 'flashmhf[plot]'"
# Words of a row's timing keys as a legend writes them.
_WORDS = {"flashmhf": "FlashMHF", "swiglu": "SwiGLU", "graph": "CUDA graph"}
_MODES = ("", "CUDA graph", "compiled")  # legend order within a family; linestyles below
_LINESTYLES = {"": "-", "CUDA graph": ":", "compiled": "--"}
_MARKERS = {"FlashMHF": "o", "SwiGLU": "s"}
# One colour per family, the same in every chart; other families (runs named by file) take the rest.
_COLORS = {"core: FlashMHF": "C0", "core: SwiGLU": "C1", "layer: FlashMHF": "C2", "layer: SwiGLU": "C3"}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable` naming the extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from None


@dataclass(frozen=True)
class Record:
    """One measured point: ``impl`` (FlashMHF, SwiGLU) of a ``run`` (core, layer; "" if only one),
    timed one way (``mode``: "" for eager, ``compiled``, ``CUDA graph``), at ``tokens`` took ``ms``;
    ``tflops`` where the work is known."""

    run: str
    impl: str
    mode: str
    tokens: int
    ms: float
    tflops: float | None = None

    @property
    def family(self) -> str:
        """What one colour stands for: ``core: FlashMHF``."""
        return f"{self.run}: {self.impl}" if self.run else self.impl

    @property
    def series(self) -> str:
        """What one line stands for: ``layer: SwiGLU CUDA graph``."""
        return f"{self.family} {self.mode}".strip()


def _words(words: Iterable[str]) -> str:
    return " ".join(_WORDS.get(w, w) for w in words)


def records_from_rows(rows: Iterable[Mapping], run: str = "") -> list[Record]:
    """Every timing (``<impl>[_<mode>]_ms`` with a number) of each row dict at the row's ``tokens``,
    as records of ``run``. A None timing was not measured: left out."""
    out = []
    for row in rows:
        if "tokens" not in row:
            raise ValueError(f"a bench row needs a 'tokens' entry, got keys {sorted(row)}")
        flop = row.get("flop")
        for key, value in row.items():
            words = key.removesuffix("_ms").split("_")
            if not key.endswith("_ms") or value is None or "host" in words:
                continue
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"row at tokens={row['tokens']}: {key} must be a positive number of ms, got {value!r}")
            tflops = flop / (value * 1e-3) / 1e12 if flop else None
            out.append(Record(run, _words(words[:1]), _words(words[1:]), int(row["tokens"]), float(value), tflops))
    return out


def records_of_runs(runs: Sequence[Run]) -> list[Record]:
    """The records of every run, each family prefixed by its run's bench (``core: ``, ``layer: ``),
    and by the run's file name where two runs of one bench meet (a before/after comparison)."""
    benches = [run.bench for run in runs]
    out = []
    for run in runs:
        name = run.bench if benches.count(run.bench) == 1 else f"{run.bench} ({run.source})"
        out += records_from_rows(run.rows, name)
    return out


def chart_title(runs: Sequence[Run]) -> str:
    """``repo-1.3b bf16 forward on NVIDIA H200`` for runs of one chart (every GPU named once)."""
    first = runs[0]
    devices = ", ".join(dict.fromkeys(run.device for run in runs))
    return report_title(first.shape, first.dtype, first.backward, devices)


def chart_name(run: Run) -> str:
    """File name of the chart a run is drawn in: ``repo-1.3b-bf16-forward.png``."""
    slug = re.sub(r"[^a-z0-9.]+", "-", run.shape.lower()).strip("-")
    return f"{slug}-{run.dtype}-{direction(run.backward).replace('+', '-')}.png"


def _mode_rank(mode: str) -> tuple[int, str]:
    return (_MODES.index(mode), mode) if mode in _MODES else (len(_MODES), mode)


def _series(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by series, families in order of first appearance and modes in _MODES order,
    each sorted by tokens."""
    records = list(records)
    families = list(dict.fromkeys(r.family for r in records))
    groups: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: (families.index(r.family), _mode_rank(r.mode), r.tokens)):
        groups.setdefault(r.series, []).append(r)
    return groups


def plot_records(records: Iterable[Record], path: str | Path, title: str, note: str = "") -> dict[str, list[str]]:
    """Write a PNG with two panels, time (ms, log) and TFLOP/s (linear) against tokens (log), to
    ``path``: one colour per family, one line style per mode, ``note`` under the title. Returns the
    series drawn in each panel (``{"time": [...], "tflops": [...]}``)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    groups = _series(records)
    if not groups:
        raise ValueError("nothing to plot: no timed rows")
    fig = Figure(figsize=(11, 5.4), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global figure state, no display needed
    time_ax, tf_ax = fig.subplots(1, 2)
    families = list(dict.fromkeys(points[0].family for points in groups.values()))
    colors = _colors(families)
    drawn: dict[str, list[str]] = {"time": [], "tflops": []}
    lines = {}
    for name, points in groups.items():
        first = points[0]
        style = {"color": colors[first.family], "linestyle": _LINESTYLES.get(first.mode, "-."),
                 "marker": _MARKERS.get(first.impl, "^"), "markersize": 4, "label": name}
        lines[name] = time_ax.plot([r.tokens for r in points], [r.ms for r in points], **style)[0]
        drawn["time"].append(name)
        with_tf = [r for r in points if r.tflops is not None]
        if with_tf:
            tf_ax.plot([r.tokens for r in with_tf], [r.tflops for r in with_tf], **style)
            drawn["tflops"].append(name)
    all_tokens = sorted({r.tokens for points in groups.values() for r in points})
    for ax in (time_ax, tf_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
        ax.minorticks_off()
        ax.set_xlabel("tokens T")
        ax.grid(True, alpha=0.3)
    time_ax.set_yscale("log")
    time_ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    time_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    time_ax.yaxis.set_minor_locator(LogLocator(subs="all"))
    time_ax.set_ylabel("time per call (ms, median; log)")
    time_ax.set_title("time (lower is better)")
    tf_ax.set_ylabel("TFLOP/s")
    tf_ax.set_title("throughput (higher is better): a SwiGLU FFN's FLOPs\n"
                    "6·T·d_model·d_ff (×3 with backward) over each time", fontsize="medium")
    if not drawn["tflops"]:
        tf_ax.text(0.5, 0.5, "no FLOP count for these rows", ha="center", va="center", transform=tf_ax.transAxes)
    tf_ax.set_ylim(bottom=0)
    handles, labels = _legend_grid(groups, families, lines)
    fig.legend(handles, labels, loc="outside lower center", ncols=len(families), fontsize="small", frameon=False)
    fig.suptitle(title + (f"\n{note}" if note else ""))
    fig.savefig(Path(path), dpi=100)
    return drawn


def _colors(families: list[str]) -> dict[str, str]:
    spare = iter(f"C{i}" for i in range(4, 10))
    return {f: _COLORS.get(f) or next(spare, "black") for f in families}


def _legend_grid(groups: dict[str, list[Record]], families: list[str], lines: dict) -> tuple[list, list[str]]:
    """Legend entries as a grid, one column per family and one row per mode (blanks where a family
    was not timed that way); matplotlib fills a legend column by column."""
    from matplotlib.lines import Line2D

    modes = sorted({points[0].mode for points in groups.values()}, key=_mode_rank)
    by_cell = {(points[0].family, points[0].mode): name for name, points in groups.items()}
    handles, labels = [], []
    for family in families:
        for mode in modes:
            name = by_cell.get((family, mode))
            handles.append(lines[name] if name else Line2D([], [], alpha=0))
            labels.append(name or "")
    return handles, labels


def plot_runs(runs: Sequence[Run], path: str | Path) -> dict[str, list[str]]:
    """One chart of runs that measured the same shape, dtype and direction (e.g. a core and a
    layer run of one preset), titled with them and the GPU."""
    if not runs:
        raise ValueError("nothing to plot: no runs")
    keys = {run.chart_key for run in runs}
    if len(keys) > 1:
        raise ValueError(f"one chart shows one shape, dtype and direction; these runs measured {sorted(keys)}")
    graphed = any(run.bench == "core" and not run.backward for run in runs)
    note = f"core: FlashMHF and SwiGLU at T ≤ {GRAPH_TOKENS} timed as CUDA-graph replays" if graphed else ""
    return plot_records(records_of_runs(runs), path, chart_title(runs), note)


def draw_charts(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """One chart per shape, dtype and direction among ``runs``, into ``out_dir`` (see chart_name)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.chart_key, []).append(run)
    paths = []
    for group in groups.values():
        path = out_dir / chart_name(group[0])
        plot_runs(group, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flashmhf.bench.plot",
        description="Draw the charts of saved `flashmhf bench --out` results (no GPU needed): one PNG per "
                    "shape, dtype and direction, time and TFLOP/s against tokens; the core and the layer "
                    "runs of one shape share a chart.")
    parser.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json",
                        help="the .json files that `flashmhf bench --out REPORT.md` wrote")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="folder of the PNGs, named <shape>-<dtype>-<direction>.png "
                             "(default: the first report's folder)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or args.reports[0].parent
    if not out_dir.is_dir():
        parser.error(f"--out-dir {out_dir}: not a folder")
    try:
        require_matplotlib()
        runs = [read_run(path) for path in args.reports]
        paths = draw_charts(runs, out_dir)
    except PlotUnavailable as exc:
        sys.exit(f"error: {exc}")
    except ValueError as exc:
        parser.error(str(exc))
    for path in paths:
        print(f"chart: {path}")


if __name__ == "__main__":
    main()
