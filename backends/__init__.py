"""Backend registry: which hardware runs the hot kernels.

Selection order (:func:`select`): the explicit ``backend=`` argument, then the ``NMOPT_BACKEND``
environment variable, then the input's array type (torch tensors prefer a backend that lists
``"torch"`` in ``frameworks``; numpy arrays prefer the compiled ``cffi`` backend over the
``numpy`` reference), then any backend the solver can use. A requested backend that cannot
serve falls back with a warning that says from what and why; an explicit argument that cannot
serve, and an unknown name in the variable, are errors. When the C extension is missing, numpy
inputs are served by ``numpy`` with a warning that says why.
"""

from __future__ import annotations

import os
import warnings

from nmopt.backends import cffi_backend, numpy_backend, torch_backend  # noqa: F401 - they register
from nmopt.backends._base import BACKENDS, PREFERENCE, Backend, register

ENV_VAR = "NMOPT_BACKEND"
names = BACKENDS.names
status = BACKENDS.status
available = BACKENDS.available


def get(backend: str | Backend) -> Backend:
    """Look up a backend by name (or pass an instance through).

    Raises ``ValueError`` for an unknown name (listing the valid ones) and ``ImportError`` for
    a known backend that cannot run here (with the reason).
    """
    if isinstance(backend, Backend):
        return backend
    return BACKENDS.get(backend)


def environment_backend() -> str:
    """The backend named by ``NMOPT_BACKEND`` ('' when unset); ``ValueError`` for an unknown
    name (a typo is an error, not a silent default)."""
    wanted = os.environ.get(ENV_VAR, "").strip()
    if wanted and wanted not in BACKENDS.classes:
        raise ValueError(f"{ENV_VAR}={wanted!r} is not a backend; set it to one of {names()} "
                         "or unset it")
    return wanted


def select(explicit: str | Backend | None, framework: str = "numpy",
           supported: tuple[str, ...] | None = None) -> tuple[Backend, list[str]]:
    """Choose the backend for a call; return it and the fallbacks taken (already warned).

    ``supported`` restricts the choice to backends the call can use (None: any).
    """
    fallbacks: list[str] = []

    def usable(name: str) -> str | None:
        if name not in BACKENDS.classes:
            return f"unknown backend (valid: {names()})"
        if supported is not None and name not in supported:
            return f"this call runs only on {list(supported)}"
        return BACKENDS.instance(name).unavailable_reason()

    if explicit is not None:
        if isinstance(explicit, Backend):
            return explicit, fallbacks
        reason = usable(explicit)
        if reason is not None:
            if explicit not in BACKENDS.classes:
                raise ValueError(f"backend: unknown backend {explicit!r}; choose one of {names()}")
            raise ValueError(f"backend={explicit!r} cannot serve this call: {reason}")
        return BACKENDS.instance(explicit), fallbacks

    wanted = environment_backend()
    if wanted:
        reason = usable(wanted)
        if reason is None:
            return BACKENDS.instance(wanted), fallbacks
        # the numpy reference when it can serve the call, else the preferred backend
        inst = BACKENDS.instance("numpy") if usable("numpy") is None else _preferred(framework, usable)
        msg = (f"{ENV_VAR}={wanted!r} cannot serve this call ({reason}); "
               f"falling back to {inst.name!r}")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        fallbacks.append(msg)
        return inst, fallbacks

    inst = _preferred(framework, usable)
    missing = BACKENDS.instance("cffi").unavailable_reason() if "cffi" in BACKENDS.classes else None
    if framework == "numpy" and inst.name == "numpy" and missing is not None:
        # The C kernels would serve numpy inputs; say once per call site that they are absent.
        msg = f"{missing}; the numpy backend serves instead (slower)"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        fallbacks.append(msg)
    return inst, fallbacks


def _preferred(framework: str, usable) -> Backend:
    """The first usable backend for the input type, in :data:`PREFERENCE` order; else any usable
    backend, since solvers convert inputs to numpy; else numpy."""
    order = names()
    for name in order:
        if framework in BACKENDS.classes[name].frameworks and usable(name) is None:
            return BACKENDS.instance(name)
    for name in order:
        if usable(name) is None:
            return BACKENDS.instance(name)
    return BACKENDS.instance("numpy")


__all__ = ["Backend", "BACKENDS", "PREFERENCE", "ENV_VAR", "register", "names", "status", "available",
           "get", "select", "environment_backend"]
