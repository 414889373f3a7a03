"""PNG charts of benchmark results: time and TFLOP/s against token count, one line per series.

The chart knows nothing of the bench's row types: it draws generic :class:`Record` values, and
:func:`records_from_rows` turns any row dict into them (every ``<name>_ms`` entry is a series, its
TFLOP/s from the row's ``flop`` when the row has one). A new timing column in a row therefore shows
up in the chart without a change here. matplotlib is an optional extra (``pip install
'flashmhf[plot]'``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Words of a row's timing keys as they are written in a legend.
_WORDS = {"flashmhf": "FlashMHF", "swiglu": "SwiGLU"}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class Record:
    """One measured point: ``series`` (the legend entry) at ``tokens`` took ``ms``; ``tflops`` where
    the work is known (None: the point is drawn in the time panel only)."""

    series: str
    tokens: int
    ms: float
    tflops: float | None = None


def series_label(key: str, prefix: str = "") -> str:
    """Legend text of a row's timing key: ``swiglu_compiled_ms`` -> ``SwiGLU compiled``."""
    words = key.removesuffix("_ms").split("_")
    return prefix + " ".join(_WORDS.get(w, w) for w in words)


def records_from_rows(rows: Iterable[Mapping], prefix: str = "") -> list[Record]:
    """Every timing (``<name>_ms`` with a number) of each row dict, at the row's ``tokens``; ``prefix``
    goes before each series name (e.g. ``"layer: "``). A None timing was not measured: left out."""
    out = []
    for row in rows:
        if "tokens" not in row:
            raise ValueError(f"a bench row needs a 'tokens' entry, got keys {sorted(row)}")
        flop = row.get("flop")
        for key, value in row.items():
            if not key.endswith("_ms") or value is None:
                continue
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"row at tokens={row['tokens']}: {key} must be a positive number of ms, got {value!r}")
            tflops = flop / (value * 1e-3) / 1e12 if flop else None
            out.append(Record(series_label(key, prefix), int(row["tokens"]), float(value), tflops))
    return out


def _series(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by series (in order of first appearance), each sorted by tokens."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.series, []).append(r)
    return {name: sorted(points, key=lambda r: r.tokens) for name, points in groups.items()}


def plot_records(records: Iterable[Record], path: str | Path, title: str) -> dict[str, list[str]]:
    """Write a PNG with two panels, time (ms, log) and TFLOP/s against tokens (log2), to ``path``.
    Returns the series drawn in each panel (``{"time": [...], "tflops": [...]}``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("charts need matplotlib: pip install 'flashmhf[plot]'") from None
    groups = _series(records)
    if not groups:
        raise ValueError("nothing to plot: no timed rows")
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global figure state, no display needed
    time_ax, tf_ax = fig.subplots(1, 2)
    drawn: dict[str, list[str]] = {"time": [], "tflops": []}
    for name, points in groups.items():
        tokens = [r.tokens for r in points]
        line = time_ax.plot(tokens, [r.ms for r in points], marker="o", label=name)[0]
        drawn["time"].append(name)
        with_tf = [r for r in points if r.tflops is not None]
        if with_tf:
            tf_ax.plot([r.tokens for r in with_tf], [r.tflops for r in with_tf], marker="o", label=name,
                       color=line.get_color())
            drawn["tflops"].append(name)
    all_tokens = sorted({r.tokens for points in groups.values() for r in points})
    for ax in (time_ax, tf_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
        ax.set_xlabel("tokens")
        ax.grid(True, which="both", alpha=0.3)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("time (ms, median)")
    time_ax.set_title("time")
    time_ax.legend(fontsize="small")
    tf_ax.set_ylabel("TFLOP/s")
    tf_ax.set_title("TFLOP/s (FFN FLOPs)")
    if drawn["tflops"]:
        tf_ax.legend(fontsize="small")
    else:
        tf_ax.text(0.5, 0.5, "no FLOP count for these rows", ha="center", va="center", transform=tf_ax.transAxes)
    tf_ax.set_ylim(bottom=0)
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return drawn
