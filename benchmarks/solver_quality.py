"""The solver-quality record: ``nmopt bench gap`` with the configuration of the solver-core issue.

N(0,1) matrices of 1024 x 1024 and 4096 x 4096 plus the six real MiniLM layer-0 matrices
(``../shared/data/minilm-l6-layer0.safetensors``, skipped with a note when absent), patterns
2:4, 4:8, 8:16 and 16:32, every registered solver and every baseline. The LP, networkx and
PyTorch's tile reference run only where their estimated time stays under ``TIME_LIMIT`` seconds;
elsewhere the results say why they were skipped. Writes
``benchmarks/results/solver_quality.{json,md,png}``. Extra arguments are passed on to
``nmopt bench gap`` (e.g. ``--time-limit 0`` to run everything, ``--repeat 3``).

Run from the repository root: ``.venv/bin/python benchmarks/solver_quality.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nmopt.cli import main

HERE = Path(__file__).resolve().parent
REAL_WEIGHTS = HERE.parent.parent / "shared" / "data" / "minilm-l6-layer0.safetensors"
RESULTS = HERE / "results"
TIME_LIMIT = 120


def argv(extra: list[str]) -> list[str]:
    """The ``nmopt`` arguments of the record."""
    args = ["bench", "gap", "--sizes", "1024,4096", "--dists", "gaussian",
            "--patterns", "2:4,4:8,8:16,16:32", "--time-limit", str(TIME_LIMIT),
            "--json", str(RESULTS / "solver_quality.json"),
            "--markdown", str(RESULTS / "solver_quality.md"),
            "--plot", str(RESULTS / "solver_quality.png")]
    if REAL_WEIGHTS.exists():
        args += ["--weights", os.path.relpath(REAL_WEIGHTS)]  # no machine paths in the record
    else:
        print(f"note: real weights not found at {REAL_WEIGHTS}; synthetic matrices only",
              file=sys.stderr)
    return args + extra


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    sys.exit(main(argv(sys.argv[1:])))
