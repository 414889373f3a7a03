"""The result file of ``flashmhf bench --out``: the .json beside the Markdown report, a list of rows
(one per token count), each tagged with what was measured (``bench``: core or layer, ``shape``,
``dtype``, ``device``). The report, the charts and any later comparison are drawn from these rows.

Files written before the rows carried ``shape``/``dtype``/``device`` take them from the title line of
the Markdown report beside them (written by the same run); their layer rows get the ``flop`` that
layer rows carry now.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from flashmhf.bench.timing import ffn_flop
from flashmhf.codegen.dtypes import DTYPES

BENCHES = ("core", "layer")
TAGS = ("bench", "shape", "dtype", "device")


def direction(backward: bool) -> str:
    return "forward+backward" if backward else "forward"


def report_title(shape: str, dtype: str, backward: bool, device: str, *, layer: bool = False) -> str:
    """The title of a bench report (``repo-1.3b bf16 layer forward on NVIDIA H200``) or, without
    ``layer``, of a chart of the core and the layer."""
    return f"{shape} {dtype} {'layer ' if layer else ''}{direction(backward)} on {device}"


# report_title, read back (the shape may hold spaces: ``d_model=512 H=4 d_ff=1024 E=4``).
_TITLE = re.compile(rf"^# (?P<shape>.+) (?P<dtype>{'|'.join(DTYPES)}) (?P<layer>layer )?"
                    r"(?P<direction>forward\+backward|forward) on (?P<device>.+)$")


@dataclass(frozen=True)
class Run:
    """The rows of one bench run (one report file) and what they measured."""

    source: str  # the report's file name without suffix: names the run where two of a kind meet
    bench: str  # core | layer
    shape: str  # a preset name, or the explicit sizes
    dtype: str
    backward: bool
    device: str  # the GPU's name
    rows: tuple[dict, ...]

    @property
    def chart_key(self) -> tuple[str, str, bool]:
        """Runs with the same key share one chart (the core and the layer of one preset, say)."""
        return (self.shape, self.dtype, self.backward)


def tag_rows(rows: list[dict], bench: str, shape: str, dtype: str, device: str) -> list[dict]:
    """The rows as the .json holds them: each with the tags of its run."""
    if bench not in BENCHES:
        raise ValueError(f"bench must be one of {', '.join(BENCHES)}, got {bench!r}")
    return [{**row, "bench": bench, "shape": shape, "dtype": dtype, "device": device} for row in rows]


def read_run(path: Path) -> Run:
    """The run recorded in a bench .json; ``ValueError`` naming the file if it is not one."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable bench result ({exc})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "tokens" in r for r in rows):
        raise ValueError(f"{path}: expected the .json of `flashmhf bench --out` (a list of rows with 'tokens')")
    rows = [_with_tags(row, path) for row in rows]
    tags = {tuple(row.get(t) for t in (*TAGS, "backward")) for row in rows}
    if len(tags) > 1:
        raise ValueError(f"{path}: rows of more than one run (bench, shape, dtype, device, backward differ)")
    bench, shape, dtype, device, backward = tags.pop()
    rows = [_with_flop(row) for row in rows]
    return Run(path.stem, bench, shape, dtype, bool(backward), device, tuple(rows))


def _with_tags(row: dict, path: Path) -> dict:
    """``row`` with its run's tags; from the report's title where the row has none (older files)."""
    if all(t in row for t in TAGS):
        return row
    title = _title_fields(path.with_suffix(".md"))
    # Rows written before rows were tagged with their bench: a layer row counts parameters.
    bench = row.get("bench", "layer" if "flashmhf_params" in row else "core")
    return {**title, "bench": bench, **row}


def _title_fields(report: Path) -> dict:
    """shape, dtype and device from the first line of a bench Markdown report."""
    try:
        first = report.read_text().splitlines()[0]
    except (OSError, IndexError):
        raise ValueError(f"{report.with_suffix('.json')}: its rows do not say which shape, dtype and GPU they "
                         f"measured, and there is no report {report.name} beside it to tell") from None
    match = _TITLE.match(first)
    if match is None:
        raise ValueError(f"{report}: first line is not a bench report title: {first!r}")
    return {"shape": match["shape"], "dtype": match["dtype"], "device": match["device"]}


def _with_flop(row: dict) -> dict:
    """Layer rows written before they carried their ``flop``: the SwiGLU's, from its parameter count."""
    if row.get("flop") is None and row.get("bench") == "layer" and "swiglu_params" in row:
        return {**row, "flop": ffn_flop(row["tokens"], row["swiglu_params"], bool(row.get("backward")))}
    return row
