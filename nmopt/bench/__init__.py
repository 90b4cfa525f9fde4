"""Benchmarks behind ``nmopt bench <name>``.

Each name in :data:`BENCHMARKS` is a module ``nmopt.bench.<name>`` exposing
``add_parser(subparsers) -> argparse.ArgumentParser``; it registers its sub-command and sets a
handler with ``parser.set_defaults(func=handler)``, where ``handler(args) -> int`` returns the
exit code. Importing such a module must stay light (torch, ortools and networkx are imported by
the handler, not at module level). A module that is not there is skipped; any other import
error is a bug and propagates. Shared table, JSON, Markdown and plot writers live in
:mod:`nmopt._report`, timing in :mod:`nmopt.bench._timing`.
"""

from __future__ import annotations

import importlib

#: Benchmarks in the order ``nmopt bench --help`` lists them.
BENCHMARKS = ("gap", "train", "speed", "kernels", "posttrain", "prune_memory")


def add_parsers(subparsers) -> list[str]:
    """Register every importable benchmark on ``subparsers``; return the names registered."""
    added = []
    for name in BENCHMARKS:
        module_name = f"{__name__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.add_parser(subparsers)
        added.append(name)
    return added
