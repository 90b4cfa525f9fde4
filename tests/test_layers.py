"""The package's layers import in one direction, deferred imports included (ARCHITECTURE.md).

Reads every shipped module's source (not the installed package), resolves each import of an
nmopt module, including imports inside functions, and checks that no module imports a higher
layer and that the import graph has no cycle. Also keeps modules and C files short.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"nmopt": "nmopt", "solvers": "nmopt.solvers", "backends": "nmopt.backends"}

#: Lowest layer first; a module belongs to the first prefix that matches its name.
LAYERS = [
    ("core", ("nmopt._arrays", "nmopt._tiles", "nmopt.patterns", "nmopt._registry", "nmopt._costs",
              "nmopt.diversity", "nmopt.result", "nmopt._packed", "nmopt.errors", "nmopt._version")),
    ("certificates", ("nmopt.certificates", "nmopt.masks")),
    ("backends", ("nmopt.backends",)),
    ("solvers", ("nmopt.solvers",)),
    ("find_mask", ("nmopt.api", "nmopt.packed")),
    ("io", ("nmopt._atomic", "nmopt.checkpoint", "nmopt._report", "nmopt.safetensors_stream")),
    ("prune/posttrain/training", ("nmopt.prune", "nmopt.prune_stream", "nmopt.nm_format", "nmopt.posttrain",
                                  "nmopt.training")),
    ("bench", ("nmopt.bench",)),
    ("cli", ("nmopt.demo", "nmopt.cli", "nmopt.__main__")),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "csrc" in path.parts:
                continue
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _layer(name: str) -> int:
    if name == "nmopt":  # the public package: find_mask's layer
        return 4
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"module {name} belongs to no layer: add it to LAYERS and ARCHITECTURE.md")


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """nmopt modules that ``name`` imports anywhere in its source."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            # "from pkg import sub" imports the submodule; "from mod import name" the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in mods and t != name:
                out.add(t)
    return out


MODS = _modules()
GRAPH = {name: _imports(name, path, MODS) for name, path in MODS.items()}


def test_every_module_has_a_layer():
    for name in MODS:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODS))
def test_no_import_goes_up_a_layer(name):
    up = [t for t in GRAPH[name] if _layer(t) > _layer(name)]
    assert not up, f"{name} (layer {LAYERS[_layer(name)][0]}) imports higher layers: {up}"


def test_imports_form_a_dag():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if nxt == "nmopt" or node == "nmopt":
                continue  # the public package re-exports; nothing below imports it
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def test_nothing_below_the_api_imports_the_public_package():
    below = [n for n in GRAPH if _layer(n) < 4 and "nmopt" in GRAPH[n]]
    assert not below, f"import the defining module instead of 'nmopt' in {below}"


def test_modules_and_c_files_stay_short():
    long_py = {n: len(p.read_text().splitlines()) for n, p in MODS.items()}
    long_py = {n: k for n, k in long_py.items() if k > 400}
    assert not long_py, f"modules over 400 lines: {long_py}"
    long_c = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "backends" / "csrc").glob("*.[ch]")}
    long_c = {n: k for n, k in long_c.items() if k > 700}
    assert not long_c, f"C files over 700 lines: {long_c}"


def test_benchmarks_hold_no_standalone_benchmark_code():
    """benchmarks/ holds records and at most thin scripts that call the nmopt CLI."""
    for path in (ROOT / "benchmarks").rglob("*.py"):
        text = path.read_text()
        assert "from nmopt.cli import main" in text and len(text.splitlines()) <= 80, path
