"""Backend registry: which hardware runs the hot kernels.

Selection order (:func:`select`): the explicit ``backend=`` argument, then the ``NMOPT_BACKEND``
environment variable, then the input's array type (torch tensors prefer a backend that lists
``"torch"`` in ``frameworks``; numpy arrays prefer the compiled ``cffi`` backend over the
``numpy`` reference), then any backend the solver can use. A requested backend that cannot
serve falls back with a warning that says from what and why; an explicit argument that cannot
serve is an error. When the C extension is missing, numpy inputs are served by ``numpy`` with
a warning that says why.
"""

from __future__ import annotations

import os
import warnings

from nmopt.backends._base import Backend

_REGISTRY: dict[str, type[Backend]] = {}
_INSTANCES: dict[str, Backend] = {}

ENV_VAR = "NMOPT_BACKEND"


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError("a backend class needs a non-empty name")
    _REGISTRY[cls.name] = cls
    _INSTANCES.pop(cls.name, None)
    return cls


def _instance(name: str) -> Backend:
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def names() -> list[str]:
    """Every registered backend name, in registry order."""
    return list(_REGISTRY)


def status() -> dict[str, str | None]:
    """Map each registered backend to None (usable) or the reason it is not."""
    return {name: _instance(name).unavailable_reason() for name in _REGISTRY}


def available() -> list[str]:
    """Names of the backends usable here."""
    return [name for name, reason in status().items() if reason is None]


def get(backend: str | Backend) -> Backend:
    """Look up a backend by name (or pass an instance through).

    Raises ``ValueError`` for an unknown name (listing the valid ones) and ``ImportError`` for
    a known backend that cannot run here (with the reason).
    """
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str) or backend not in _REGISTRY:
        raise ValueError(f"backend: unknown backend {backend!r}; choose one of {names()}")
    inst = _instance(backend)
    reason = inst.unavailable_reason()
    if reason is not None:
        raise ImportError(f"backend {backend!r} is not available: {reason}")
    return inst


def select(explicit: str | Backend | None, framework: str = "numpy",
           supported: tuple[str, ...] | None = None) -> tuple[Backend, list[str]]:
    """Choose the backend for a call; return it and the fallbacks taken (already warned).

    ``supported`` restricts the choice to backends the solver can use (None: any).
    """
    fallbacks: list[str] = []

    def usable(name: str) -> str | None:
        if name not in _REGISTRY:
            return f"unknown backend (valid: {names()})"
        if supported is not None and name not in supported:
            return f"the solver runs only on {list(supported)}"
        return _instance(name).unavailable_reason()

    if explicit is not None:
        if isinstance(explicit, Backend):
            return explicit, fallbacks
        reason = usable(explicit)
        if reason is not None:
            if explicit not in _REGISTRY:
                raise ValueError(f"backend: unknown backend {explicit!r}; choose one of {names()}")
            raise ValueError(f"backend={explicit!r} cannot serve this call: {reason}")
        return _instance(explicit), fallbacks

    wanted = os.environ.get(ENV_VAR, "").strip()
    if wanted:
        reason = usable(wanted)
        if reason is None:
            return _instance(wanted), fallbacks
        # the numpy reference when it can serve the call, else the preferred backend
        inst = _instance("numpy") if usable("numpy") is None else _preferred(framework, usable)
        msg = (f"{ENV_VAR}={wanted!r} cannot serve this call ({reason}); "
               f"falling back to {inst.name!r}")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        fallbacks.append(msg)
        return inst, fallbacks

    inst = _preferred(framework, usable)
    missing = _instance("cffi").unavailable_reason() if "cffi" in _REGISTRY else None
    if framework == "numpy" and inst.name == "numpy" and missing is not None:
        # The C kernels would serve numpy inputs; say once per call site that they are absent.
        msg = f"{missing}; the numpy backend serves instead (slower)"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        fallbacks.append(msg)
    return inst, fallbacks


def _preferred(framework: str, usable) -> Backend:
    """The first usable backend for the input type (the C kernels first, then registry order);
    else any usable backend, since solvers convert inputs to numpy; else numpy."""
    order = ["cffi"] * ("cffi" in _REGISTRY) + [name for name in _REGISTRY if name != "cffi"]
    for name in order:
        if framework in _REGISTRY[name].frameworks and usable(name) is None:
            return _instance(name)
    for name in order:
        if usable(name) is None:
            return _instance(name)
    return _instance("numpy")


# Built-in backends register themselves on import; numpy first (the reference).
from nmopt.backends import numpy_backend as _numpy_backend  # noqa: E402,F401
from nmopt.backends import cffi_backend as _cffi_backend  # noqa: E402,F401
from nmopt.backends import torch_backend as _torch_backend  # noqa: E402,F401
