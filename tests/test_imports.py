"""Import hygiene: ``import nmopt`` stays light, and the mapped packages never leak top-level.

``solvers/`` and ``backends/`` are installed as ``nmopt.solvers`` and ``nmopt.backends``; a stray
``import solvers`` would work from the repository root and break in site-packages, so each check
runs in a fresh interpreter started in the repository root, where such a mistake would succeed
silently and show up in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ortools", "networkx")


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_nmopt_is_light():
    got = run(
        "import json, sys\n"
        "import nmopt\n"
        "nmopt.solvers.status(); nmopt.backends.status(); nmopt.solvers.available()\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    for name in HEAVY:
        assert name not in got, f"import nmopt (and registry status) imported {name}"


def test_no_top_level_solvers_or_backends_module():
    got = run(
        "import json, sys\n"
        "import numpy as np\n"
        "import nmopt\n"
        "w = np.random.default_rng(0).standard_normal((16, 24))\n"
        "for name in nmopt.solvers.available():\n"
        "    inst = nmopt.solvers.get(name)\n"
        "    if inst.refuses(2, 4, False, 24) is None:\n"
        "        nmopt.find_mask(w, '2:4', solver=name, transposable=inst.transposable)\n"
        "nmopt.find_mask(w, '4:8'); nmopt.mask_diversity('2:4'); nmopt.check_mask(w > 5, '2:4')\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    for top in ("solvers", "backends"):
        leaked = [m for m in got if m == top or m.startswith(top + ".")]
        assert not leaked, f"top-level {top!r} modules were imported: {leaked}"
    assert "nmopt.solvers" in got and "nmopt.backends" in got


def test_packages_resolve_inside_nmopt():
    got = run(
        "import json, nmopt.solvers, nmopt.backends, nmopt.solvers.greedy\n"
        "print(json.dumps([nmopt.solvers.__name__, nmopt.backends.__name__,\n"
        "                  nmopt.solvers.greedy.__name__]))\n"
    )
    assert got == ["nmopt.solvers", "nmopt.backends", "nmopt.solvers.greedy"]


def test_uninstalled_checkout_says_how_to_install(tmp_path):
    """In a source tree that was never installed, nmopt.solvers/backends do not exist: the
    ImportError must say so and how to install, not report a circular import."""
    import shutil

    for folder in ("nmopt", "solvers", "backends"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_kernels*"))
    # -S: no site-packages, so no editable install can map the folders
    out = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, '.'); import nmopt"],
                         cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: nmopt is not installed"), out.stderr
    assert "make install" in last and "pip install -e ." in last
    assert "circular" not in last
