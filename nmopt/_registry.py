"""One registry implementation for solvers and backends: named plug-ins with a preference order.

A :class:`Registry` maps names to plug-in classes filled by its ``register`` decorator. Which
plug-in is preferred is an explicit tuple (as cvxpy's solver list "in order of decreasing
preference"), never the order in which modules happen to be imported; plug-ins that the tuple
does not name come after it, in registration order.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable


class Plugin:
    """What every solver and backend declares: a name and the Python modules it needs."""

    name: str = ""
    #: Python modules that must be importable; checked with ``find_spec``, never imported.
    requires: tuple[str, ...] = ()
    #: pip extra that installs what ``requires`` names.
    extra: str | None = None

    def unavailable_reason(self) -> str | None:
        """None if usable here, else a human reason such as 'torch: not installed'."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                hint = f" (pip install 'nmopt[{self.extra}]')" if self.extra else ""
                return f"{module}: not installed{hint}"
        return None


class Registry:
    """An ordered name -> plug-in class mapping with one shared instance per name.

    Parameters
    ----------
    kind : what the plug-ins are ("solver", "backend"), for messages
    preference : names in order of decreasing preference
    reserved : names a plug-in may not take (e.g. "auto")
    """

    def __init__(self, kind: str, preference: Iterable[str] = (), reserved: Iterable[str] = ()):
        self.kind = kind
        self.preference = tuple(preference)
        self.reserved = tuple(reserved)
        self.classes: dict[str, type[Plugin]] = {}
        self.instances: dict[str, Plugin] = {}

    def register(self, cls: type[Plugin]) -> type[Plugin]:
        """Class decorator: add a plug-in under ``cls.name`` (replacing one of that name)."""
        if not cls.name or cls.name in self.reserved:
            reserved = "".join(f" other than {r!r}" for r in self.reserved)
            raise ValueError(f"a {self.kind} class needs a non-empty name{reserved}")
        self.classes[cls.name] = cls
        self.instances.pop(cls.name, None)
        return cls

    def names(self) -> list[str]:
        """Every registered name, in preference order."""
        first = [name for name in self.preference if name in self.classes]
        return first + [name for name in self.classes if name not in first]

    def instance(self, name: str) -> Plugin:
        """The shared instance of a registered name."""
        if name not in self.instances:
            self.instances[name] = self.classes[name]()
        return self.instances[name]

    def status(self) -> dict[str, str | None]:
        """Map each registered name, in preference order, to None (usable) or why it is not."""
        return {name: self.instance(name).unavailable_reason() for name in self.names()}

    def available(self) -> list[str]:
        """Names usable here, in preference order."""
        return [name for name, reason in self.status().items() if reason is None]

    def get(self, name: str) -> Plugin:
        """The usable instance of ``name``: ``ValueError`` for an unknown name (listing the
        valid ones), ``ImportError`` with the reason for one that cannot run here."""
        if not isinstance(name, str) or name not in self.classes:
            raise ValueError(f"{self.kind}: unknown {self.kind} {name!r}; choose one of {self.names()}")
        inst = self.instance(name)
        reason = inst.unavailable_reason()
        if reason is not None:
            raise ImportError(f"{self.kind} {name!r} is not available: {reason}")
        return inst
