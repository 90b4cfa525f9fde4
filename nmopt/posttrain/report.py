"""What :func:`nmopt.prune_model` did, layer by layer: errors, certificates, time."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from nmopt.certificates import OPTIMALITY_TOL


@dataclass
class LayerReport:
    """One pruned layer.

    Attributes
    ----------
    name : str
        Full module name, e.g. ``model.layers.0.self_attn.q_proj``.
    shape : tuple of int
        ``(out, in)`` of the weight as pruned (an HF ``Conv1D`` is reported transposed).
    method, pattern : str
    transposable : bool
    error_before : float
        Relative reconstruction error ``‖XWᵀ − X(W⊙mask)ᵀ‖² / ‖XWᵀ‖²`` of the final mask with the
        original weights kept (mask only), on the calibration inputs of the layer.
    error_after : float
        The same for the weights written to the model (after reconstruction).
    gaps : list of float
        Certified relative optimality gap of every mask step, in order (one for magnitude and
        wanda and adaprune, one per group of M columns for sparsegpt, one per projection for
        admm); a gap of at most ``nmopt.OPTIMALITY_TOL`` proves that step's mask optimal.
    kept : float
        Fraction of the weights kept by the mask.
    seconds : float
        Wall time of the layer's pruning (mask search and reconstruction).
    iterations : int
        Iterations of the method (ADMM iterations, Adam steps; 0 where there are none).
    fallback : bool
        True when the method's reconstruction did not beat the mask alone on the calibration
        inputs and the mask-only weights ``W⊙mask`` were written instead (reported so it is seen).
    """

    name: str
    shape: tuple
    method: str
    pattern: str
    transposable: bool
    error_before: float
    error_after: float
    gaps: list = field(default_factory=list)
    kept: float = 0.0
    seconds: float = 0.0
    iterations: int = 0
    fallback: bool = False

    @property
    def max_gap(self) -> float:
        """Largest certified gap of the layer's mask steps (0 when there were none)."""
        return max(self.gaps, default=0.0)

    @property
    def certified(self) -> bool:
        """Every mask step of the layer was proven optimal."""
        return self.max_gap <= OPTIMALITY_TOL


@dataclass
class SkippedLayer:
    """A Linear inside the blocks that was left dense, and why."""

    name: str
    shape: tuple
    reason: str


@dataclass
class PruneReport:
    """The result of :func:`nmopt.prune_model`: one row per layer plus totals.

    Attributes
    ----------
    layers : list of LayerReport
        Pruned layers in the order they were pruned.
    skipped : list of SkippedLayer
        Linear layers left dense, with the reason.
    config : dict
        The :class:`PruneConfig` settings, as plain values.
    blocks : str
        Where the blocks were found, e.g. ``"model.layers (30 blocks)"``.
    samples, tokens : int
        Calibration batches' samples, and their tokens seen by the first block (padding, where
        a dict batch's ``attention_mask`` marks it, left out).
    seconds : float
        Wall time of the whole call.
    """

    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    blocks: str = ""
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    # totals ------------------------------------------------------------------------------
    @property
    def layers_pruned(self) -> int:
        return len(self.layers)

    @property
    def layers_skipped(self) -> int:
        return len(self.skipped)

    @property
    def mean_error_before(self) -> float:
        """Mean over pruned layers of the mask-only relative error (nan without layers)."""
        return _mean([r.error_before for r in self.layers])

    @property
    def mean_error_after(self) -> float:
        """Mean over pruned layers of the final relative error (nan without layers)."""
        return _mean([r.error_after for r in self.layers])

    @property
    def mask_seconds(self) -> float:
        """Sum of the per-layer pruning times (the rest of ``seconds`` is forward passes)."""
        return float(sum(r.seconds for r in self.layers))

    @property
    def max_gap(self) -> float:
        """Largest certified gap of any mask step of any layer."""
        return max((r.max_gap for r in self.layers), default=0.0)

    @property
    def projections(self) -> int:
        """Number of exact mask steps (calls of the solver) in the whole run."""
        return int(sum(len(r.gaps) for r in self.layers))

    def totals(self) -> dict:
        """The totals as one dict (also written by :meth:`to_json`)."""
        return {"layers_pruned": self.layers_pruned, "layers_skipped": self.layers_skipped,
                "mean_error_before": self.mean_error_before, "mean_error_after": self.mean_error_after,
                "max_gap": self.max_gap, "projections": self.projections, "seconds": self.seconds,
                "mask_seconds": self.mask_seconds}

    # serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        for row in out["layers"] + out["skipped"]:
            row["shape"] = list(row["shape"])
        out["totals"] = self.totals()
        return _json_safe(out)

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """The report as JSON text (non-finite numbers as null); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> PruneReport:
        if not isinstance(data, dict):
            raise TypeError(f"from_dict: expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"layers", "skipped"}
        rep = cls(**{k: v for k, v in data.items() if k in known})
        lay = {f.name for f in fields(LayerReport)}
        for row in data.get("layers", []):
            row = {k: v for k, v in row.items() if k in lay}
            row["shape"] = tuple(row["shape"])
            for key in ("error_before", "error_after", "kept", "seconds"):  # to_json: non-finite as null
                row[key] = math.nan if row.get(key) is None else row[key]
            row["gaps"] = [math.nan if g is None else g for g in row.get("gaps", [])]
            rep.layers.append(LayerReport(**row))
        for row in data.get("skipped", []):
            rep.skipped.append(SkippedLayer(name=row["name"], shape=tuple(row["shape"]), reason=row["reason"]))
        return rep

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> PruneReport:
        """Rebuild a report from :meth:`to_json` text or a file holding it."""
        text = os.fspath(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        return cls.from_dict(json.loads(text))

    # text ----------------------------------------------------------------------------------
    def table(self) -> str:
        """A fixed-width text table: one line per pruned or skipped layer, then the totals."""
        width = max([len(r.name) for r in self.layers + self.skipped] + [5])
        head = (f"{'layer':<{width}}  {'shape':>11}  {'method':<9}  {'err before':>10}  {'err after':>10}  "
                f"{'steps':>5}  {'max gap':>9}  {'seconds':>8}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(str(s) for s in r.shape)
            mark = "  (fell back to mask only)" if r.fallback else ""
            lines.append(f"{r.name:<{width}}  {shape:>11}  {r.method:<9}  {r.error_before:>10.4g}  "
                         f"{r.error_after:>10.4g}  {len(r.gaps):>5}  {r.max_gap:>9.2e}  {r.seconds:>8.2f}{mark}")
        for r in self.skipped:
            shape = "x".join(str(s) for s in r.shape)
            lines.append(f"{r.name:<{width}}  {shape:>11}  dense: {r.reason}")
        lines.append("-" * len(head))
        pattern = self.config.get("pattern", "?")
        kind = "transposable" if self.config.get("transposable", True) else "row-wise"
        lines.append(f"{self.config.get('method', '?')} {pattern} {kind}: {self.layers_pruned} layers pruned, "
                     f"{self.layers_skipped} left dense; mean error {self.mean_error_before:.4g} (mask only) -> "
                     f"{self.mean_error_after:.4g}; max gap {self.max_gap:.2e} over {self.projections} "
                     f"exact mask steps; {self.seconds:.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(values) / len(values)) if values else math.nan


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
