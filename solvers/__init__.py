"""Solver registry: which algorithm picks the mask, and the one place that pairs it with a backend.

The preference order of ``solver="auto"`` is :data:`PREFERENCE` (the first available exact
solver that takes the problem). ``solver=`` accepts a registered name, a :class:`Solver`
instance or a plain callable ``f(tiles, n, saturate) -> bool tiles``. :func:`plan` resolves a
call's solver and backend together; :func:`nmopt.find_mask` and sparse training use it.
"""

from __future__ import annotations

from nmopt.backends import environment_backend as _environment_backend
from nmopt.backends import names as _backend_names
from nmopt.backends import select as _select_backend
from nmopt.solvers import enumerate as _enumerate  # noqa: F401 - the built-in solvers register
from nmopt.solvers import exact as _exact  # noqa: F401
from nmopt.solvers import greedy as _greedy  # noqa: F401
from nmopt.solvers import networkx_flow as _networkx_flow  # noqa: F401
from nmopt.solvers import ortools_lp as _ortools_lp  # noqa: F401
from nmopt.solvers import ortools_mcf as _ortools_mcf  # noqa: F401
from nmopt.solvers import rowwise as _rowwise  # noqa: F401
from nmopt.solvers._base import PREFERENCE, SOLVERS, CallableSolver, Solver, register

names = SOLVERS.names
status = SOLVERS.status
available = SOLVERS.available


def get(solver) -> Solver:
    """Resolve a name, instance or callable to a :class:`Solver`.

    Raises ``ValueError`` for an unknown name and ``ImportError`` (naming the pip extra) for a
    known solver whose dependencies are missing.
    """
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str):
        if solver not in SOLVERS.classes:
            raise ValueError(f"solver: unknown solver {solver!r}; choose 'auto' or one of {names()}")
        return SOLVERS.get(solver)
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
    """The preferred available solver for the problem: exact first, in :data:`PREFERENCE` order.

    With ``backend`` (a name the caller asked for), solvers that cannot run on it are skipped.
    """
    reasons = []
    for name in names():
        inst = SOLVERS.instance(name)
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


def check_kind(solver, transposable: bool, what: str = "solver") -> None:
    """``ValueError`` naming ``what`` when ``solver`` is an unknown name or a solver of the other
    kind of mask than ``transposable`` asks for; "auto", instances and callables pass. Checks
    the name only (no import), so configurations can check it when they are built."""
    if not isinstance(solver, str) or solver == "auto":
        return
    cls = SOLVERS.classes.get(solver)
    if cls is None:
        raise ValueError(f"{what}: unknown solver {solver!r}; choose 'auto' or one of {names()}")
    if cls.transposable != transposable:
        kind = "transposable" if cls.transposable else "row-wise"
        raise ValueError(f"{what}: {solver!r} finds {kind} masks but transposable={transposable}; "
                         "use 'auto' or a solver of the same kind")


def plan(solver, backend, n: int, m: int, *, transposable: bool, saturate: bool, num_tiles: int,
         edge_tiles: bool = False, framework: str = "numpy"):
    """The solver and backend of one call, chosen together: ``(Solver, Backend, fallbacks)``.

    ``solver="auto"`` takes the preferred exact solver that can run on the backend the caller
    asked for (argument, else ``NMOPT_BACKEND``); a named solver must match ``transposable`` and
    take the pattern. The backend is then chosen among those the solver runs on
    (:func:`nmopt.backends.select`), preferring one for the input's ``framework``.
    """
    if isinstance(solver, str) and solver == "auto":
        wanted = backend if backend is not None else _environment_backend()  # unknown: an error
        wanted = getattr(wanted, "name", wanted)
        if wanted not in _backend_names():
            wanted = None  # an unknown argument is reported by backend selection
        inst = auto(n, m, transposable=transposable, saturate=saturate, num_tiles=num_tiles,
                    backend=wanted, edge_tiles=edge_tiles)
    else:
        inst = get(solver)
        if inst.transposable != transposable:
            kind = "transposable" if inst.transposable else "row-wise"
            raise ValueError(f"solver {inst.name!r} finds {kind} masks but transposable={transposable}; "
                             "use solver='auto'")
        why = refusal(inst, n, m, saturate, num_tiles, edge_tiles)
        if why is not None:
            raise ValueError(f"solver={inst.name!r} cannot solve {n}:{m} here: {why}")
    engine, fallbacks = _select_backend(backend, framework, inst.backends)
    return inst, engine, fallbacks


__all__ = ["Solver", "CallableSolver", "SOLVERS", "PREFERENCE", "register", "names", "status", "available",
           "get", "auto", "refusal", "check_kind", "plan"]
