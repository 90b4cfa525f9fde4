"""``nmopt demo``: the main job on built-in data -- benchmark the solvers, prune a generated
checkpoint, re-validate what was written."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nmopt import solvers
from nmopt._tiles import TileGrid
from nmopt.api import find_mask
from nmopt.bench import gap
from nmopt.checkpoint import load, save
from nmopt.masks import check_mask
from nmopt.patterns import parse_pattern
from nmopt.prune import print_report, prune_file

DEMO_SIZES = ((512, 512), (1024, 1024))
DEMO_PATTERN = "4:8"
DEMO_TIME_LIMIT = 10.0  # seconds per benchmark run


def demo_state_dict(seed: int = 0) -> dict:
    """A small seeded checkpoint: Linear and Conv weights with biases, a LayerNorm, a BatchNorm
    (with its int64 counter), an embedding, a float16 layer and shapes that are not multiples
    of 8."""
    rng = np.random.default_rng(seed)

    def weight(*shape, dtype=np.float32):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_t(4, size=shape) / np.sqrt(fan_in)).astype(dtype)

    def zeros(*shape):
        return np.zeros(shape, dtype=np.float32)

    return {
        "embed.weight": weight(1000, 128),
        "stem.conv.weight": weight(32, 3, 3, 3), "stem.conv.bias": zeros(32),
        "stem.bn.weight": np.ones(32, np.float32), "stem.bn.bias": zeros(32),
        "stem.bn.running_mean": zeros(32), "stem.bn.running_var": np.ones(32, np.float32),
        "stem.bn.num_batches_tracked": np.array(0, dtype=np.int64),
        "blocks.0.norm.weight": np.ones(128, np.float32), "blocks.0.norm.bias": zeros(128),
        "blocks.0.attn.qkv.weight": weight(384, 128), "blocks.0.attn.qkv.bias": zeros(384),
        "blocks.0.attn.proj.weight": weight(128, 128), "blocks.0.attn.proj.bias": zeros(128),
        "blocks.0.mlp.fc1.weight": weight(512, 128, dtype=np.float16),
        "blocks.0.mlp.fc1.bias": zeros(512),
        "blocks.0.mlp.fc2.weight": weight(128, 512), "blocks.0.mlp.fc2.bias": zeros(128),
        "head.weight": weight(10, 128), "head.bias": zeros(10),
    }


def run_demo(out: Path, time_limit: float | None = DEMO_TIME_LIMIT) -> None:
    """Write the benchmark, the demo checkpoint, its pruned copy, masks and report under ``out``."""

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    files = {"bench JSON": out / "gap.json", "bench Markdown": out / "gap.md",
             "bench plot": out / "gap.png", "demo checkpoint": out / "demo-model.safetensors",
             "pruned checkpoint": out / "demo-model-4of8.safetensors",
             "masks": out / "demo-masks-4of8.safetensors",
             "prune report": out / "demo-prune-report.json"}
    sizes = ", ".join(f"{r}x{c}" for r, c in DEMO_SIZES)
    print(f"[1/3] solver-quality benchmark: Gaussian {sizes}, "
          f"{' '.join(gap.DEFAULT_PATTERNS)}, every solver and baseline", flush=True)
    result = gap.run_gap(gap.synthetic_matrices(["gaussian"], DEMO_SIZES),
                         gap.DEFAULT_PATTERNS, time_limit=time_limit)
    gap.write_outputs(result, files["bench JSON"], files["bench Markdown"], files["bench plot"])
    print(gap.format_text(result, details=False))
    print(f"(every run, skipped ones with the reason: {files['bench Markdown']})")

    print(f"\n[2/3] prune a generated checkpoint with {DEMO_PATTERN} transposable masks",
          flush=True)
    save(demo_state_dict(), files["demo checkpoint"])
    _, report = prune_file(files["demo checkpoint"], files["pruned checkpoint"], DEMO_PATTERN,
                           masks_path=files["masks"], report_path=files["prune report"])
    print_report(report)

    print("\n[3/3] re-validate the written masks and weights, tile by tile", flush=True)
    for line in verify_pruned(files["demo checkpoint"], files["pruned checkpoint"], files["masks"],
                           report):
        print(f"  ok  {line}")

    print(f"\ndone in {time.perf_counter() - start:.0f} s; outputs:")
    width = max(map(len, files))
    for what, path in files.items():
        print(f"  {what:<{width}}  {path}")


def verify_pruned(original, pruned, masks, report: dict) -> list[str]:
    """Re-check a prune from the files alone; return one line per layer (raise on failure).

    Every mask is checked tile by tile (rows and columns) with :func:`nmopt.check_mask`, the
    pruned weights must equal the original inside the mask and be zero outside, the kept score
    is recomputed from the original weights, and each layer is re-solved with a second exact
    solver when one is installed.
    """

    def second_exact(used: str, n: int, m: int, tiles: int) -> str | None:
        for name in solvers.available():
            inst = solvers.get(name)
            if (name != used and inst.exact and inst.transposable == transposable
                    and inst.refuses(n, m, report["saturate"], tiles) is None):
                return name
        return None

    def arr(t):
        return t if isinstance(t, np.ndarray) else t.detach().cpu().float().numpy()

    orig, new, kept = load(original), load(pruned), load(masks)
    pattern = report["pattern"]
    pat = parse_pattern(pattern)
    transposable = report["transposable"]
    lines = []
    for layer in report["layers"]:
        name = layer["name"]
        mask = arr(kept[name]).astype(bool)
        w, p = arr(orig[name]), arr(new[name])
        check_mask(mask, pattern, transposable=transposable)
        if not (np.array_equal(p[mask], w[mask]) and not p[~mask].any()):
            raise RuntimeError(f"{name}: pruned weights differ from original * mask")
        objective = float(np.abs(w[mask], dtype=np.float64).sum())
        if abs(objective - layer["objective"]) > 1e-9 * max(1.0, objective):
            raise RuntimeError(f"{name}: kept score {objective} differs from the report")
        rows, cols = mask.shape[0], mask[0].size
        other = second_exact(layer["solver"], pat.n, pat.m, TileGrid(rows, cols, pat.m).num_tiles)
        check = ""
        if other is not None:
            res = find_mask(w, pattern, transposable=transposable, saturate=report["saturate"],
                            solver=other)
            if abs(res.objective - objective) > 1e-7 * objective:
                raise RuntimeError(f"{name}: {other} finds kept score {res.objective}, the "
                                   f"prune kept {objective}")
            check = f"; re-solved with {other}: same optimum"
        lines.append(f"{name} {'x'.join(map(str, mask.shape))}: valid {pattern} "
                     f"{'transposable' if transposable else 'row-wise'} in every tile, "
                     f"weights = original * mask, kept score matches{check}")
    return lines
