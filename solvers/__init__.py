"""Solver registry: which algorithm picks the mask.

The registry is an ordered name -> class mapping; the order is the preference order of
``solver="auto"`` (the first available exact solver that takes the problem). ``solver=``
accepts a registered name, a :class:`Solver` instance or a plain callable
``f(tiles, n, saturate) -> bool tiles``.
"""

from __future__ import annotations

from nmopt.solvers._base import CallableSolver, Solver

_REGISTRY: dict[str, type[Solver]] = {}
_INSTANCES: dict[str, Solver] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: add a solver to the registry under ``cls.name``."""
    if not cls.name or cls.name == "auto":
        raise ValueError("a solver class needs a non-empty name other than 'auto'")
    _REGISTRY[cls.name] = cls
    _INSTANCES.pop(cls.name, None)
    return cls


def _instance(name: str) -> Solver:
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def names() -> list[str]:
    """Every registered solver name, in preference order."""
    return list(_REGISTRY)


def status() -> dict[str, str | None]:
    """Map each registered solver to None (usable) or the reason it is not."""
    return {name: _instance(name).unavailable_reason() for name in _REGISTRY}


def available() -> list[str]:
    """Names of the solvers usable here, in preference order."""
    return [name for name, reason in status().items() if reason is None]


def get(solver) -> Solver:
    """Resolve a name, instance or callable to a :class:`Solver`.

    Raises ``ValueError`` for an unknown name and ``ImportError`` (naming the pip extra) for a
    known solver whose dependencies are missing.
    """
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str):
        if solver not in _REGISTRY:
            raise ValueError(f"solver: unknown solver {solver!r}; choose 'auto' or one of {names()}")
        inst = _instance(solver)
        reason = inst.unavailable_reason()
        if reason is not None:
            raise ImportError(f"solver {solver!r} is not available: {reason}")
        return inst
    if callable(solver):
        return CallableSolver(solver)
    raise TypeError(f"solver: expected a name, a Solver instance or a callable, got {solver!r}")


def refusal(inst: Solver, n: int, m: int, saturate: bool, num_tiles: int,
            edge_tiles: bool = False) -> str | None:
    """Why ``inst`` does not take the problem, or None. With ``saturate`` and ``edge_tiles``
    the solver must also take the at-most-N problem (edge tiles keep at most N)."""
    why = inst.refuses(n, m, saturate, num_tiles)
    if why is None and saturate and edge_tiles:
        why = inst.refuses(n, m, False, num_tiles)
    return why


def auto(n: int, m: int, *, transposable: bool, saturate: bool, num_tiles: int,
         backend: str | None = None, edge_tiles: bool = False) -> Solver:
    """The preferred available solver for the problem: exact first, in registry order.

    With ``backend`` (a name the caller asked for), solvers that cannot run on it are skipped.
    """
    reasons = []
    for name in _REGISTRY:
        inst = _instance(name)
        if inst.transposable != transposable or not inst.exact:
            continue
        why = inst.unavailable_reason() or refusal(inst, n, m, saturate, num_tiles, edge_tiles)
        if why is None and backend is not None and inst.backends is not None \
                and backend not in inst.backends:
            why = f"runs only on {list(inst.backends)}, not on backend {backend!r}"
        if why is None:
            return inst
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no exact solver can take {n}:{m} (saturate={saturate}) here: "
                       + "; ".join(reasons))


# Built-in solvers, in preference order for "auto".
from nmopt.solvers import c_exact as _c_exact  # noqa: E402,F401
from nmopt.solvers import rowwise as _rowwise  # noqa: E402,F401
from nmopt.solvers import enumeration as _enumeration  # noqa: E402,F401
from nmopt.solvers import ortools_flow as _ortools_flow  # noqa: E402,F401
from nmopt.solvers import ortools_lp as _ortools_lp  # noqa: E402,F401
from nmopt.solvers import networkx_flow as _networkx_flow  # noqa: E402,F401
from nmopt.solvers import greedy as _greedy  # noqa: E402,F401
from nmopt.solvers import torch_exact as _torch_exact  # noqa: E402,F401

__all__ = ["Solver", "CallableSolver", "register", "names", "status", "available", "get", "auto", "refusal"]
