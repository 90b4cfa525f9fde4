"""Tables, Markdown and the plot of ``nmopt bench gap`` (built on :mod:`nmopt._report`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from nmopt._report import Column, format_table, markdown_table
from nmopt._report import write_outputs as write_files

#: Gaps below this are rounding noise of a certified optimum; plotted and shown as 0.
GAP_FLOOR = 1e-9


def fmt_gap(g: float) -> str:
    """A relative gap as a percentage; certified-optimal noise (< ``GAP_FLOOR``) as 0."""
    return "0" if g < GAP_FLOOR else f"{100 * g:.3g}%"


def _note(row: dict) -> str:
    if row["status"] != "ok":
        return f"skipped: {row['reason']}"
    if row["problem"] == "row-wise" and row.get("vs_optimum"):
        return f"row-wise keeps x{row['vs_optimum']:.4f} the transposable optimum"
    if row["problem"] == "exactly-N":
        return "exactly N per row and column"
    return ""


def detail_columns() -> list[Column]:
    return [
        Column("matrix", "matrix", align="<"), Column("pattern", "N:M", align="<"),
        Column("solver", "solver", align="<"),
        Column("kept_fraction", "kept", lambda v: f"{100 * v:.3f}%"),
        Column("gap", "gap", fmt_gap), Column("own_gap", "own bound", fmt_gap),
        Column("deficit", "deficit"), Column("seconds", "seconds", "{:.3f}"),
        Column("weights_per_s", "Mw/s", lambda v: f"{v / 1e6:.2f}"),
        Column("note", "note", align="<"),
    ]


def summary(result: dict) -> list[dict]:
    """Per pattern and solver: matrices run, median and worst gap, median seconds, Mw/s."""
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["pattern"], r["solver"]), []).append(r)
    for (pattern, solver), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        row = {"pattern": pattern, "solver": solver, "runs": f"{len(ok)}/{len(rs)}"}
        if ok:
            gaps = [r["gap"] for r in ok if r["gap"] is not None]
            if gaps:
                row.update(median_gap=statistics.median(gaps), worst_gap=max(gaps))
            ratios = [r["vs_optimum"] for r in ok if r["vs_optimum"] is not None]
            if ratios and ok[0]["problem"] == "row-wise":
                row["vs_optimum"] = statistics.median(ratios)
            row["seconds"] = statistics.median(r["seconds"] for r in ok)
            row["weights_per_s"] = (sum(r["weights"] for r in ok)
                                    / sum(r["seconds"] for r in ok))
        out.append(row)
    return out


def summary_columns() -> list[Column]:
    return [
        Column("pattern", "N:M", align="<"), Column("solver", "solver", align="<"),
        Column("runs", "ran"), Column("median_gap", "median gap", fmt_gap),
        Column("worst_gap", "worst gap", fmt_gap),
        Column("vs_optimum", "row-wise / opt", "x{:.4f}"),
        Column("seconds", "median s", "{:.3f}"),
        Column("weights_per_s", "Mw/s", lambda v: f"{v / 1e6:.2f}"),
    ]


def format_text(result: dict, details: bool = True) -> str:
    """The terminal report: detail table (optional), summary, references that were not exact."""
    rows = [dict(r, note=_note(r)) for r in result["rows"]]
    title = ("Summary (gap: relative loss against the certified optimum; row-wise / opt: the "
             "price of transposability)")
    parts = [format_table(rows, detail_columns()), ""] if details else []
    parts += [title, format_table(summary(result), summary_columns())]
    notes = [f"{r['matrix']} {r['pattern']}: {r['note']}" for r in result["references"]
             if r["note"]]
    if notes:
        parts += ["", *notes]
    parts += ["", f"total {result['seconds_total']:.1f} s"]
    return "\n".join(parts)


def format_markdown(result: dict, plot: str | None = None) -> str:
    """The Markdown report: configuration, summary, every row, skipped contenders.

    ``plot`` is the plot's path relative to the Markdown file, shown under the summary.
    """
    env = result["environment"]
    cfg = result["config"]
    rows = [dict(r, note=_note(r)) for r in result["rows"]]
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = {}
    for r in rows:
        if r["status"] != "ok":
            skipped.setdefault((r["solver"], r["reason"]), []).append(f"{r['matrix']} "
                                                                      f"{r['pattern']}")
    versions = env["versions"]
    machine = (f"nmopt {versions.get('nmopt')}, Python {env['python']}, numpy "
               f"{versions.get('numpy')}, torch {versions.get('torch')}, ortools "
               f"{versions.get('ortools')}; {env['platform']}, {env['affinity'] or env['cpus']} "
               f"usable CPUs. Total run time {result['seconds_total']:.0f} s.")
    setup = (f"Patterns {', '.join(cfg['patterns'])}; repeat {cfg['repeat']} (median seconds); "
             f"time limit {cfg['time_limit']} s per run (estimated before running). Matrices: "
             + "; ".join(f"{m['name']} {tuple(m['shape'])}" for m in cfg["matrices"]) + ".")
    legend = ("*gap* = (certified optimum bound - kept score) / bound, where the bound is the "
              "lowest dual bound any solver proved on that matrix (an exact solver's, unless "
              "noted); it is an upper bound on the true relative loss, and 0 means below "
              f"{GAP_FLOOR:g} (certified optimal up to rounding). *own bound* is the gap "
              "the solver's own prices certify. *kept* is the kept share of sum |W|. *deficit* "
              "counts rows plus columns of full tiles keeping fewer than N. Seconds are whole "
              "`find_mask` calls, certificate included. Row-wise N:M is not transposable and "
              "keeps more; its ratio to the transposable optimum is the price of "
              "transposability.")
    lines = [
        "# Solver quality: gap to the certified optimum", "", machine, "", setup, "", legend, "",
        "## Summary", "", markdown_table(summary(result), summary_columns()), "",
        *([f"![gap vs seconds per N:M and solver]({plot})", ""] if plot else []),
        "## All runs", "", markdown_table(ok, detail_columns()), "",
    ]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- **{solver}** on {len(where)} run{'s' if len(where) > 1 else ''} "
                  f"({', '.join(where[:4])}"
                  f"{', ...' if len(where) > 4 else ''}): {reason}"
                  for (solver, reason), where in skipped.items()]
        lines.append("")
    notes = [r for r in result["references"] if r["note"]]
    if notes:
        lines += ["## References that are not exact", ""]
        lines += [f"- {r['matrix']} {r['pattern']}: {r['note']}" for r in notes]
        lines.append("")
    return "\n".join(lines)


def draw_plot(result: dict) -> Callable[[Any], None]:
    """A drawer for :func:`nmopt._report.write_plot`: gap vs seconds, one panel per N:M."""

    def draw(fig) -> None:
        patterns = result["config"]["patterns"]
        rows = [r for r in result["rows"] if r["status"] == "ok" and r["gap"] is not None]
        solvers = list(dict.fromkeys(r["solver"] for r in rows))
        markers = "osD^v<>pPhX*"
        cols = min(4, max(1, len(patterns)))
        nrows = -(-len(patterns) // cols)
        axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
        for ax, pattern in zip(axes.flat, patterns):
            for k, solver in enumerate(solvers):
                pts = [r for r in rows if r["pattern"] == pattern and r["solver"] == solver]
                if pts:
                    ax.scatter([r["seconds"] for r in pts],
                               [max(r["gap"], GAP_FLOOR) for r in pts],
                               marker=markers[k % len(markers)], color=f"C{k % 10}",
                               label=solver, alpha=0.8)
            ax.axhline(GAP_FLOOR, color="grey", ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(pattern)
            ax.set_xlabel("seconds (log)")
            ax.grid(True, which="major", alpha=0.3)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"gap to certified optimum (log; < {GAP_FLOOR:g} = optimal)")
        for ax in list(axes.flat)[len(patterns):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        for ax in axes.flat:
            h, lab = ax.get_legend_handles_labels()
            seen.update(zip(lab, h))
        if seen:  # no row with a gap (only exact solvers, say): no legend
            fig.legend(list(seen.values()), list(seen.keys()), loc="lower center",
                       ncol=min(len(seen), 7), frameon=False, bbox_to_anchor=(0.5, -0.02))
        fig.suptitle("Solver quality vs time: one point per matrix (lower left is better)")
        fig.tight_layout(rect=(0, 0.06, 1, 1))

    return draw


def write_outputs(result: dict, json_path=None, markdown_path=None, plot_path=None) -> list[str]:
    """Write the requested files (atomically); return their paths."""
    n = len(result["config"]["patterns"])
    cols = min(4, max(1, n))
    paths = SimpleNamespace(json=json_path, markdown=markdown_path, plot=plot_path)
    return write_files(paths, result, lambda plot: format_markdown(result, plot), draw_plot(result),
                       figsize=(4.2 * cols, 3.8 * -(-n // cols) + 1))
