"""``nmopt bench posttrain``: one-shot pruning of a pretrained LM, perplexity per method and pattern.

The model (default: SmolLM2-135M-Instruct from ``../shared/data``, a LLaMA-architecture LM in
GGUF, dequantized to float32) is loaded once and its dense weights are kept; every run restores
them and prunes every Linear of every block in one shot with :func:`nmopt.prune_model`. Text:
the Python documentation that ships with CPython (``pydoc_data/topics.py``, the topics in file
order), tokenized once; calibration windows come from the first half of the tokens, perplexity
from the last 40% (non-overlapping windows, ``--eval-tokens`` of them), so the two never overlap.

Runs: dense; transposable 2:4, 4:8, 8:16, 16:32 x magnitude, wanda, sparsegpt, admm; row-wise
2:4 and 4:8 x wanda, sparsegpt, admm (the price of transposability per method); adaprune at
transposable 4:8. Each row: perplexity, mean relative reconstruction error of the pruned layers
after their method (and of the mask alone, before reconstruction), worst certified gap and the
pruning seconds. Targets of the issue, checked on the same run and recorded met / missed:
admm at transposable 4:8 <= 1/4 of wanda's perplexity; best transposable 16:32 <= best row-wise
2:4; admm <= sparsegpt <= wanda <= magnitude at every pattern; admm prunes in <= 10 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import nmopt
from nmopt._report import (
    Column,
    add_output_arguments,
    check_output_arguments,
    environment,
    format_table,
    markdown_table,
    write_outputs,
)
from nmopt.bench._args import THREADS, check_out_dir, integer
from nmopt.patterns import parse_pattern

DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATTERNS = ("2:4", "4:8", "8:16", "16:32")
METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
ROWWISE = ("2:4", "4:8")
ROWWISE_METHODS = ("wanda", "sparsegpt", "admm")
ADAPRUNE = ("4:8",)
KNOWN_METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "adaprune")
CALIB_FRACTION, EVAL_START = 0.5, 0.6
ADMM_LIMIT_S = 600.0
QUICK = {"nsamples": 2, "seqlen": 32, "eval_tokens": 256, "patterns": ["4:8"], "methods": ["wanda"],
         "rowwise": [], "adaprune": []}


def default_model() -> Path:
    """``../shared/data/<SmolLM2>`` from the working directory, else next to this checkout."""
    here = Path.cwd().parent / "shared" / "data" / DEFAULT_MODEL
    repo = Path(__file__).resolve().parents[3] / "shared" / "data" / DEFAULT_MODEL
    return here if here.exists() or not repo.exists() else repo


def load_text(path: str | None) -> tuple[str, str]:
    """The benchmark text and where it came from (``--text`` or CPython's pydoc topics)."""
    if path:
        from nmopt.posttrain.pretrained import read_text  # imports torch

        return read_text(path, "--text"), str(path)
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values()), pydoc_data.topics.__file__


def plan(args) -> list[dict]:
    """The runs, in order: dense, transposable x methods, row-wise x methods, adaprune."""
    runs = [] if args.no_dense else [{"kind": "dense", "pattern": None, "method": "dense"}]
    runs += [{"kind": "transposable", "pattern": p, "method": m} for p in args.patterns for m in args.methods]
    runs += [{"kind": "row-wise", "pattern": p, "method": m} for p in args.rowwise
             for m in args.rowwise_methods]
    runs += [{"kind": "transposable", "pattern": p, "method": "adaprune"} for p in args.adaprune
             if "adaprune" not in args.methods or p not in args.patterns]
    for r in runs:
        r["run"] = "dense" if r["kind"] == "dense" else f"{r['kind']} {r['pattern']} {r['method']}"
    return runs


def summarize(report) -> dict:
    """Mean reconstruction errors (before/after), worst certified gap and layer count of a report."""
    def get(row, *keys):
        for k in keys:
            v = row.get(k) if isinstance(row, dict) else getattr(row, k, None)
            if v is not None:
                return v
        return None

    rows = [r for r in (getattr(report, "layers", None) or []) if get(r, "method") != "dense"]
    after = [float(v) for v in (get(r, "error_after", "error") for r in rows) if v is not None]
    before = [float(v) for v in (get(r, "error_before") for r in rows) if v is not None]
    gaps = []
    for r in rows:
        g = get(r, "gaps", "gap")
        gaps += [float(x) for x in (g if isinstance(g, (list, tuple)) else [g]) if x is not None]
    return {"error": sum(after) / len(after) if after else None,
            "error_before": sum(before) / len(before) if before else None,
            "max_gap": max(gaps) if gaps else None, "layers": len(rows)}


def run(args) -> dict:
    import torch

    from nmopt.posttrain.pretrained import (  # imports torch
        calibration_windows,
        encode,
        load_pretrained,
        max_positions,
        perplexity,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    text, source = load_text(args.text)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    loaded = load_pretrained(args.model or default_model())
    model = loaded.model
    load_s = time.perf_counter() - t0
    ids = encode(loaded.tokenizer, text)
    n = ids.numel()
    calib_ids, eval_ids = ids[: int(CALIB_FRACTION * n)], ids[int(EVAL_START * n):][: args.eval_tokens]
    positions = max_positions(model.config)
    calibration = calibration_windows(calib_ids, args.nsamples, args.seqlen, args.seed, positions)
    eval_seqlen = min(args.eval_seqlen or args.seqlen, positions or 1 << 30)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for r in plan(args):
        model.load_state_dict(dense)
        row, seconds = dict(r), None
        if r["kind"] != "dense":
            cfg = nmopt.PruneConfig(pattern=r["pattern"], transposable=r["kind"] == "transposable",
                                    method=r["method"])
            t0 = time.perf_counter()
            report = nmopt.prune_model(model, calibration, cfg, progress=args.progress)
            seconds = time.perf_counter() - t0
            row.update(summarize(report))
        t0 = time.perf_counter()
        row.update(ppl=perplexity(model, eval_ids, eval_seqlen), seconds=seconds,
                   eval_s=time.perf_counter() - t0)
        rows.append(row)
        if not args.quiet:
            took = "" if seconds is None else f", pruned in {seconds:.1f} s"
            print(f"{row['run']}: perplexity {row['ppl']:.2f}{took}", flush=True)
    model.load_state_dict(dense)
    settings = {k: getattr(args, k) for k in ("nsamples", "seqlen", "seed", "eval_tokens")}
    settings.update(model=str(args.model or default_model()), model_class=type(model).__name__,
                    text=source, tokens=n, calibration_tokens=calib_ids.numel(),
                    eval_tokens_used=(eval_ids.numel() // eval_seqlen) * eval_seqlen, eval_seqlen=eval_seqlen,
                    load_s=load_s, threads=torch.get_num_threads(), calib_fraction=CALIB_FRACTION,
                    eval_start=EVAL_START, loadavg_start=load_before,
                    loadavg_end=os.getloadavg() if hasattr(os, "getloadavg") else None)
    return {"benchmark": "posttrain", "settings": settings, "rows": rows,
            "targets": check_targets(rows), "environment": environment()}


def _find(rows, kind, pattern, method):
    return next((r for r in rows if (r["kind"], r["pattern"], r["method"]) == (kind, pattern, method)), None)


def check_targets(rows: list[dict], admm_limit_s: float = ADMM_LIMIT_S) -> list[dict]:
    """Each target of the issue: ``status`` met / missed / not run, and the figures behind it."""
    out = []

    def add(target, ok, detail):
        out.append({"target": target, "status": "not run" if ok is None else ("met" if ok else "missed"),
                    "detail": detail})

    a, w = _find(rows, "transposable", "4:8", "admm"), _find(rows, "transposable", "4:8", "wanda")
    add("admm transposable 4:8 perplexity <= 1/4 of wanda's", None if not (a and w) else a["ppl"] <= w["ppl"] / 4,
        "needs both runs" if not (a and w) else f"admm {a['ppl']:.2f} vs wanda {w['ppl']:.2f} / 4 = "
        f"{w['ppl'] / 4:.2f}")
    t16 = [r for r in rows if r["kind"] == "transposable" and r["pattern"] == "16:32"]
    r24 = [r for r in rows if r["kind"] == "row-wise" and r["pattern"] == "2:4"]
    if t16 and r24:
        bt, br = min(t16, key=lambda r: r["ppl"]), min(r24, key=lambda r: r["ppl"])
        add("best transposable 16:32 <= best row-wise 2:4", bt["ppl"] <= br["ppl"],
            f"transposable 16:32 {bt['method']} {bt['ppl']:.2f} vs row-wise 2:4 {br['method']} {br['ppl']:.2f}")
    else:
        add("best transposable 16:32 <= best row-wise 2:4", None, "needs both patterns")
    order = ("admm", "sparsegpt", "wanda", "magnitude")
    for kind, pattern in dict.fromkeys((r["kind"], r["pattern"]) for r in rows if r["kind"] != "dense"):
        present = [m for m in order if _find(rows, kind, pattern, m)]
        ppl = {m: _find(rows, kind, pattern, m)["ppl"] for m in present}
        if len(present) < 2:
            continue
        bad = [f"{x} {ppl[x]:.2f} > {y} {ppl[y]:.2f}" for x, y in zip(present, present[1:]) if ppl[x] > ppl[y]]
        add(f"{' <= '.join(present)} at {kind} {pattern}", not bad,
            "; ".join(bad) or ", ".join(f"{m} {ppl[m]:.2f}" for m in present))
    admm = [r for r in rows if r["method"] == "admm"]
    worst = max(admm, key=lambda r: r["seconds"]) if admm else None
    add(f"admm prunes the model in <= {admm_limit_s / 60:g} minutes", None if not worst
        else worst["seconds"] <= admm_limit_s,
        "no admm run" if not worst else f"slowest admm run: {worst['run']}, {worst['seconds']:.0f} s")
    return out


COLUMNS = [
    Column("run", "run", align="<"), Column("ppl", "perplexity", "{:.2f}"),
    Column("error_before", "err (mask)", "{:.4f}"), Column("error", "err (after)", "{:.4f}"),
    Column("max_gap", "max gap", "{:.1e}"), Column("layers", "layers"),
    Column("seconds", "prune s", "{:.1f}"), Column("eval_s", "eval s", "{:.1f}"),
]
TARGET_COLUMNS = [Column("target", "target", align="<"), Column("status", "status", align="<"),
                  Column("detail", "figures", align="<")]


def _patterns(rows: list[dict]) -> list[str]:
    """The patterns of the runs, by M then N."""
    return sorted({r["pattern"] for r in rows if r["pattern"]}, key=lambda p: tuple(map(int, p.split(":")))[::-1])


def pivot(rows: list[dict]) -> tuple[list[dict], list[Column]]:
    """Perplexity by method and mask kind (rows) and pattern (columns)."""
    patterns = _patterns(rows)
    table: dict[str, dict] = {}
    for r in rows:
        if r["kind"] != "dense":
            table.setdefault(f"{r['method']} ({r['kind']})", {"what": f"{r['method']} ({r['kind']})"})[
                r["pattern"]] = r["ppl"]
    cols = [Column("what", "method (masks)", align="<")] + [Column(p, p, "{:.2f}") for p in patterns]
    return list(table.values()), cols


def _load(s: dict) -> str:
    """The machine's load averages (1, 5, 15 min) at the start and the end, when recorded."""
    a, b = s.get("loadavg_start"), s.get("loadavg_end")
    return "" if not (a and b) else (f"; load average {'/'.join(f'{x:.1f}' for x in a)} at the start, "
                                     f"{'/'.join(f'{x:.1f}' for x in b)} at the end (times depend on it)")


def format_markdown(result: dict) -> str:
    s = result["settings"]
    piv, pcols = pivot(result["rows"])
    lines = [
        "# nmopt bench posttrain", "",
        (f"{s['model_class']} from `{Path(s['model']).name}`, every Linear of every block pruned in one "
         f"shot. Text: `{Path(s['text']).name}` ({s['tokens']} tokens); calibration: {s['nsamples']} "
         f"random windows of {s['seqlen']} tokens (seed {s['seed']}) from the first "
         f"{s['calibration_tokens']} tokens; perplexity on {s['eval_tokens_used']} held-apart tokens "
         f"(from {s['eval_start']:.0%} of the text on, non-overlapping windows of {s['eval_seqlen']}). "
         f"{s['threads']} torch threads{_load(s)}. err: mean relative reconstruction error "
         "||XW^T - XW'^T||^2 / ||XW^T||^2 of the pruned layers on their calibration inputs, with the "
         "mask alone and after the method's reconstruction."), "",
        markdown_table(result["rows"], COLUMNS), "", "Perplexity:", "", markdown_table(piv, pcols), "",
        "## Targets", "", markdown_table(result["targets"], TARGET_COLUMNS), "",
    ]
    return "\n".join(lines)


def draw_plot(result: dict):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        patterns = _patterns(result["rows"])
        series: dict[tuple, list] = {}
        for r in result["rows"]:
            if r["kind"] == "dense":
                ax.axhline(r["ppl"], color="black", ls=":", label=f"dense {r['ppl']:.1f}")
            else:
                series.setdefault((r["method"], r["kind"]), []).append((patterns.index(r["pattern"]), r["ppl"]))
        for (method, kind), pts in series.items():
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", ls="-" if kind == "transposable" else "--", label=f"{method} ({kind})")
        ax.set_xticks(range(len(patterns)), patterns)
        ax.set_yscale("log")
        ax.set_xlabel("N:M pattern")
        ax.set_ylabel("perplexity (held-apart text)")
        ax.set_title("nmopt bench posttrain: one-shot pruning of a pretrained LM")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return draw


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _validate(args) -> str | None:
    for flag, values in (("--methods", args.methods), ("--rowwise-methods", args.rowwise_methods)):
        bad = [m for m in values if m not in KNOWN_METHODS]
        if bad:
            return f"{flag}: unknown method {', '.join(bad)}; choose from {', '.join(KNOWN_METHODS)}"
    for flag, values in (("--patterns", args.patterns), ("--rowwise", args.rowwise), ("--adaprune", args.adaprune)):
        for p in values:
            try:
                parse_pattern(p)
            except (ValueError, TypeError) as exc:
                return f"{flag}: {exc}"
    return None


def main(args) -> int:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    why = _validate(args)
    if why:
        print(f"nmopt bench posttrain: error: {why}", file=sys.stderr)
        return 2
    check_out_dir(args.out)
    if args.out:  # the plot only where matplotlib is installed
        outputs = [("json", "json"), ("markdown", "md")]
        if importlib.util.find_spec("matplotlib") is not None:
            outputs.append(("plot", "png"))
        for flag, ext in outputs:
            setattr(args, flag, getattr(args, flag) or str(Path(args.out) / f"posttrain.{ext}"))
        check_output_arguments(args)
    result = run(args)
    print(format_table(result["rows"], COLUMNS))
    print(format_table(result["targets"], TARGET_COLUMNS))
    if args.out:  # made only now: a failed run leaves no empty directory
        Path(args.out).mkdir(parents=True, exist_ok=True)
    write_outputs(args, result, format_markdown(result), draw_plot(result), figsize=(9.0, 5.5))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("posttrain", help="one-shot pruning of a pretrained LM: perplexity per "
                              "method and N:M pattern", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="MODEL", help=f"HF model directory or .gguf file (default "
                   f"../shared/data/{DEFAULT_MODEL})")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text instead of CPython's pydoc topics")
    p.add_argument("--patterns", type=_csv, default=list(PATTERNS), metavar="N:M,...",
                   help=f"transposable patterns (default {','.join(PATTERNS)})")
    p.add_argument("--methods", type=_csv, default=list(METHODS), metavar="M,...",
                   help=f"methods for the transposable patterns (default {','.join(METHODS)})")
    p.add_argument("--rowwise", type=_csv, default=list(ROWWISE), metavar="N:M,...",
                   help=f"row-wise patterns (default {','.join(ROWWISE)}; '' for none)")
    p.add_argument("--rowwise-methods", type=_csv, default=list(ROWWISE_METHODS), metavar="M,...",
                   help=f"methods for the row-wise patterns (default {','.join(ROWWISE_METHODS)})")
    p.add_argument("--adaprune", type=_csv, default=list(ADAPRUNE), metavar="N:M,...",
                   help=f"transposable patterns pruned with adaprune (default {','.join(ADAPRUNE)}; '' for none)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    p.add_argument("--nsamples", type=integer(1), default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=integer(1), default=512, help="calibration window length (default 512)")
    p.add_argument("--eval-tokens", type=integer(1), default=16384, metavar="T",
                   help="held-apart tokens for perplexity (default 16384)")
    p.add_argument("--eval-seqlen", type=int, default=0, metavar="L",
                   help="perplexity window length (default: --seqlen)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=THREADS, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--progress", action="store_true", help="per-block progress bars")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (tests, smoke)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", metavar="DIR", help="write DIR/posttrain.{json,md,png}")
    add_output_arguments(p)
    p.set_defaults(func=main)
    return p
