"""Shared report writers for `nmopt prune` and the `nmopt bench` commands: tables, JSON, Markdown, plots.

Rows are plain dicts; a list of :class:`Column` says which keys to show and how. Every file is
written atomically (temporary file in the same directory, then ``os.replace``), so an
interrupted benchmark never leaves a half-written result. matplotlib is imported only by
:func:`write_plot` and drives the Agg canvas directly (no pyplot, no display needed).

Example
-------
>>> cols = [Column("solver", "solver", align="<"), Column("seconds", "s", "{:.3f}")]
>>> print(format_table([{"solver": "mcf", "seconds": 0.5}], cols))
solver      s
------  -----
mcf     0.500
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from nmopt.checkpoint import AtomicFiles

MISSING = "-"


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header, a format and the alignment.

    ``fmt`` is a ``str.format`` pattern such as ``"{:.3f}"`` or a callable ``value -> str``;
    a missing or None value shows as ``-``. ``align`` is ``">"`` (numbers) or ``"<"`` (text).
    """

    key: str
    header: str
    fmt: str | Callable[[Any], str] = "{}"
    align: str = ">"

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return MISSING
        if callable(self.fmt):
            return self.fmt(value)
        return self.fmt.format(value)


def _cells(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> list[list[str]]:
    return [[c.cell(r) for c in columns] for r in rows]


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> str:
    """An aligned plain-text table (header, dashes, one line per row)."""
    body = _cells(rows, columns)
    widths = [max([len(c.header)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{v:{c.align}{w}}" for v, c, w in zip(cells, columns, widths)).rstrip()

    out = [line([c.header for c in columns]), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column],
                file: TextIO | None = None) -> None:
    """Print :func:`format_table` to ``file`` (default stdout)."""
    print(format_table(rows, columns), file=file or sys.stdout)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` inside cells is escaped."""
    body = _cells(rows, columns)
    rule = ["---:" if c.align == ">" else ":---" for c in columns]
    lines = [[c.header for c in columns], rule] + body
    return "\n".join("| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in lines)


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, tuples, paths and non-finite floats made JSON-safe."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(data: Any) -> str:
    """``data`` as indented JSON text (numpy values converted, NaN/inf -> null)."""
    return json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json_text(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (e.g. a Markdown report) atomically."""
    with AtomicFiles() as files:
        Path(files.add(path)).write_text(text, encoding="utf-8")


def write_plot(path: str | os.PathLike, draw: Callable[[Any], None],
               figsize: tuple[float, float] = (10.0, 6.0), dpi: int = 120) -> None:
    """Create a figure, let ``draw(fig)`` fill it, and save it atomically.

    The image format follows the extension of ``path`` (png, svg, pdf). Uses matplotlib's Agg
    canvas without touching pyplot's global backend.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'nmopt[plot]'") from None
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    draw(fig)
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    with AtomicFiles() as files:
        fig.savefig(files.add(path), format=fmt, bbox_inches="tight")


def environment() -> dict[str, Any]:
    """Versions and machine facts worth recording next to any timing (imports nothing heavy)."""
    versions = {}
    for dist in ("nmopt", "numpy", "torch", "ortools", "scipy", "networkx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "versions": versions}


def add_output_arguments(parser, plot: bool = True) -> None:
    """The output options every benchmark shares: ``--json``, ``--markdown``, and ``--plot`` for
    those that draw one."""
    parser.add_argument("--json", metavar="OUT.json", help="write every row as JSON")
    parser.add_argument("--markdown", metavar="OUT.md", help="write a Markdown report")
    if plot:
        parser.add_argument("--plot", metavar="OUT.png", help="write a plot (matplotlib)")


#: Figure formats ``--plot`` writes (matplotlib's, by extension).
PLOT_FORMATS = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff",
                ".webp", ".pgf")


def check_output_arguments(args) -> None:
    """:class:`~nmopt.errors.UsageError` naming ``--json``, ``--markdown`` or ``--plot`` when it
    cannot be written (wrong extension, a directory, no parent directory, matplotlib missing),
    checked before a benchmark runs rather than after."""
    from nmopt.errors import UsageError

    for flag, exts in (("--json", (".json",)), ("--markdown", (".md",)), ("--plot", PLOT_FORMATS)):
        path = getattr(args, flag[2:], None)
        if not path:
            continue
        p = Path(path)
        if p.suffix.lower() not in exts:
            raise UsageError(f"{flag} {path!r}: expected a file ending in {' or '.join(exts[:4])}"
                             f"{' ...' if len(exts) > 4 else ''}")
        if p.is_dir():
            raise UsageError(f"{flag} {path!r} is a directory")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir() and getattr(args, "out", None) is None:
            raise UsageError(f"{flag} {path!r}: directory {str(parent)!r} does not exist")
    if getattr(args, "plot", None):
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install matplotlib (or 'nmopt[plot]')")


def write_outputs(args, data: Any, markdown: str | Callable[[str | None], str] | None = None,
                  draw: Callable[[Any], None] | None = None, figsize: tuple[float, float] = (8.0, 5.0)) -> list[str]:
    """Write what the :func:`add_output_arguments` options ask for; return the paths written.

    ``data`` goes to ``--json``; ``markdown`` (a text, or a function of the plot's path relative
    to the Markdown file, None without a plot) to ``--markdown``; the figure ``draw`` fills to
    ``--plot``. Each file is written atomically.
    """
    written = []
    if getattr(args, "json", None):
        write_json(args.json, data)
        written.append(str(args.json))
    if getattr(args, "markdown", None) and markdown is not None:
        if callable(markdown):
            plot = getattr(args, "plot", None) and draw is not None and os.path.relpath(
                args.plot, os.path.dirname(os.path.abspath(args.markdown)))
            markdown = markdown(plot or None)
        write_text(args.markdown, markdown)
        written.append(str(args.markdown))
    if getattr(args, "plot", None) and draw is not None:
        write_plot(args.plot, draw, figsize=figsize)
        written.append(str(args.plot))
    return written
