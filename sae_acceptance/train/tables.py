"""Sweep points -> the analysis tables, as data.

Deltas are larger minus smaller model at one depth and k; correlations of r2 and
ce_rec are pooled and within fixed k; k*(t) interpolates linearly in k; the scale
table backs SST/token out of r2. Models are ordered by size (d_model). Everything
here is arithmetic on the points, so published numbers can be checked against it;
`analysis` renders the tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import combinations
from typing import Any

import numpy as np

DEPTHS = ("early", "mid", "late")
KSTAR_TARGETS = (0.85, 0.90)
_INT_FIELDS = ("k", "d_model", "layer", "train_tokens")


@dataclass(frozen=True)
class SweepPoint:
    """One SAE of a sweep: where it sits (model, depth, k) and what it scored (None: not measured)."""

    model: str
    depth: str
    k: int
    d_model: int | None = None
    layer: int | None = None
    train_tokens: int | None = None
    r2: float | None = None
    ce_rec: float | None = None
    ce_rec_ci: tuple[float, float] | None = None
    cosine: float | None = None
    rel_error: float | None = None
    mse_mean: float | None = None
    alive_frac: float | None = None
    rate_bits: float | None = None

    @classmethod
    def from_mapping(cls, record: Mapping[str, Any]) -> SweepPoint:
        """Known fields only (a sweep may record more); a non-finite metric counts as not measured."""
        missing = [name for name in ("model", "depth", "k") if record.get(name) is None]
        if missing:
            raise ValueError(f"sweep point {dict(record)} lacks {', '.join(missing)}")
        values: dict[str, Any] = {}
        for field in fields(cls):
            value = record.get(field.name)
            if field.name in ("model", "depth"):
                values[field.name] = str(value)
            elif field.name == "ce_rec_ci":
                ends = None if value is None else tuple(_finite(v) for v in value)
                values[field.name] = ends if ends and len(ends) == 2 and None not in ends else None
            elif field.name in _INT_FIELDS:
                values[field.name] = None if value is None else int(value)
            else:
                values[field.name] = _finite(value)
        return cls(**values)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def as_points(points: Iterable[SweepPoint | Mapping[str, Any]]) -> list[SweepPoint]:
    """Accept sweep records as SweepPoints or as the plain dicts a sweep writes to points.json."""
    return [p if isinstance(p, SweepPoint) else SweepPoint.from_mapping(p) for p in points]


def models_by_size(points: Iterable[SweepPoint]) -> list[str]:
    """Model names, smaller to larger by d_model (models without one keep their order, last)."""
    width: dict[str, int | None] = {}
    for p in points:
        width.setdefault(p.model, p.d_model)
    return sorted(width, key=lambda m: (width[m] is None, width[m] or 0))


def depths_in(points: Iterable[SweepPoint]) -> list[str]:
    """Depths present, early -> mid -> late first, any others after in name order."""
    present = {p.depth for p in points}
    return [d for d in DEPTHS if d in present] + sorted(present - set(DEPTHS))


def grid_by_k(points: Iterable[SweepPoint], model: str, depth: str) -> dict[int, SweepPoint]:
    """One model's points at one depth by k; two points at one k (two budgets) are ambiguous."""
    grid: dict[int, SweepPoint] = {}
    for p in points:
        if p.model == model and p.depth == depth:
            if p.k in grid:
                raise ValueError(
                    f"two points for {model} {depth} k={p.k} (train_tokens "
                    f"{grid[p.k].train_tokens} and {p.train_tokens}): analyse one budget at a time"
                )
            grid[p.k] = p
    return dict(sorted(grid.items()))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def delta_table(points: Iterable[SweepPoint], depth: str, smaller: str, larger: str) -> list[dict[str, Any]]:
    """Δr2 and Δce_rec (larger minus smaller) at each k both models have: the proxy gap's sign test."""
    points = as_points(points)
    small, large = grid_by_k(points, smaller, depth), grid_by_k(points, larger, depth)
    return [
        {
            "k": k,
            "delta_r2": _minus(large[k].r2, small[k].r2),
            "delta_ce_rec": _minus(large[k].ce_rec, small[k].ce_rec),
        }
        for k in sorted(small.keys() & large.keys())
    ]


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, what: str = "correlation") -> float:
    """Pearson's r; a ValueError rather than NaN when it is undefined."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 3:
        raise ValueError(f"{what}: {len(a)} points, a correlation needs at least 3")
    a, b = a - a.mean(), b - b.mean()
    if np.sqrt(np.mean(a * a)) <= 1e-12 or np.sqrt(np.mean(b * b)) <= 1e-12:
        raise ValueError(f"{what}: zero variance, the correlation is undefined")
    return float(np.clip(a @ b / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def demean_within(groups: Sequence[Any], values: Sequence[float]) -> np.ndarray:
    """Subtract each group's mean: what is left varies only within a group (here: scale at fixed k)."""
    labels, v = np.asarray(groups), np.asarray(values, dtype=np.float64)
    out = v.copy()
    for g in np.unique(labels):
        out[labels == g] -= v[labels == g].mean()
    return out


def correlations(points: Iterable[SweepPoint], depth: str, strict: bool = True) -> dict[str, Any]:
    """r2 vs ce_rec at one depth: pooled over k and models, and within fixed k (scale only).

    An undefined correlation raises ValueError; with strict=False it is None instead and the
    reason is kept under "undefined" (a one-model sweep still has a pooled correlation).
    """
    measured = [p for p in as_points(points) if p.depth == depth and p.r2 is not None and p.ce_rec is not None]
    ks = [p.k for p in measured]
    # every point of `measured` has both: the filters only narrow the types
    r2 = [p.r2 for p in measured if p.r2 is not None]
    ce_rec = [p.ce_rec for p in measured if p.ce_rec is not None]
    pairs: dict[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]] = {
        "corr_pooled": (r2, ce_rec),
        "corr_within_k": (demean_within(ks, r2), demean_within(ks, ce_rec)),
    }
    result: dict[str, Any] = {"n": len(measured)}
    undefined = []
    for name, (x, y) in pairs.items():
        try:
            result[name] = pearson(x, y, f"{depth}: {name}")
        except ValueError as err:
            if strict:
                raise
            result[name] = None
            undefined.append(str(err))
    return result | ({"undefined": "; ".join(undefined)} if undefined else {})


def kstar(ks: Sequence[int], ce_recs: Sequence[float], target: float) -> float | None:
    """Smallest k with ce_rec >= target, linear in k between the grid points bracketing the first
    crossing; the first k if it already reaches the target; None if no grid point does."""
    if len(ks) != len(ce_recs):
        raise ValueError(f"{len(ks)} k values but {len(ce_recs)} ce_rec values")
    if len(set(ks)) != len(ks):
        raise ValueError(f"repeated k in {list(ks)}")
    previous = None
    for k, ce_rec in sorted(zip(ks, ce_recs, strict=True)):
        if ce_rec >= target:
            if previous is None:
                return float(k)
            k0, ce0 = previous
            return float(k0 + (target - ce0) * (k - k0) / (ce_rec - ce0))
        previous = (k, ce_rec)
    return None


def kstar_table(
    points: Iterable[SweepPoint], depth: str, targets: Sequence[float], models: Sequence[str]
) -> list[dict[str, Any]]:
    """k*(t) per model (smaller to larger) and the tax: ratio of the largest's k* to the smallest's."""
    if not models:
        raise ValueError("k* table: no models named")
    points = as_points(points)
    curves = {m: {k: p.ce_rec for k, p in grid_by_k(points, m, depth).items() if p.ce_rec is not None} for m in models}
    rows = []
    for target in targets:
        values = {m: kstar(list(c), list(c.values()), target) for m, c in curves.items()}
        first, last = values[models[0]], values[models[-1]]
        ratio = last / first if len(models) > 1 and first and last else None
        rows.append({"depth": depth, "target": target, "kstar": values, "ratio": ratio})
    return rows


def scale_table(points: Iterable[SweepPoint]) -> list[dict[str, Any]]:
    """Per-token SSE and SST: a high r2 can come from a large SST rather than a small error."""
    rows = []
    for p in _ordered(as_points(points)):
        if p.mse_mean is None or p.d_model is None or p.r2 is None:
            continue
        sse = p.mse_mean * p.d_model
        rows.append(
            {
                "model": p.model,
                "depth": p.depth,
                "k": p.k,
                "d_model": p.d_model,
                "mse_mean": p.mse_mean,
                "rel_error": p.rel_error,
                "r2": p.r2,
                "sse_per_token": sse,
                "sst_per_token": sse / (1 - p.r2) if p.r2 < 1 else None,
                "ce_rec": p.ce_rec,
                "loss_ratio": None if p.ce_rec is None else 2 - p.ce_rec,  # L_recon / L_orig
            }
        )
    return rows


def _ordered(points: list[SweepPoint]) -> list[SweepPoint]:
    depth_rank = {d: i for i, d in enumerate(depths_in(points))}
    model_rank = {m: i for i, m in enumerate(models_by_size(points))}
    return sorted(points, key=lambda p: (depth_rank[p.depth], p.k, model_rank[p.model], p.train_tokens or 0))


def analysis_report(points: Iterable[SweepPoint | Mapping[str, Any]]) -> dict[str, Any]:
    """Every analysis table for a sweep, as JSON-ready data (no NaN: undefined is None)."""
    points = _ordered(as_points(points))
    depths = depths_in(points)
    at_depth = {d: models_by_size(p for p in points if p.depth == d) for d in depths}
    return {
        "models": models_by_size(points),
        "depths": depths,
        "points": [asdict(p) | {"ce_rec_ci": list(p.ce_rec_ci) if p.ce_rec_ci else None} for p in points],
        "deltas": [
            {"depth": d, "smaller": a, "larger": b, "rows": delta_table(points, d, a, b)}
            for d in depths
            for a, b in combinations(at_depth[d], 2)
        ],
        "correlations": [{"depth": d, **correlations(points, d, strict=False)} for d in depths],
        "kstar": [row for d in depths for row in kstar_table(points, d, KSTAR_TARGETS, at_depth[d])],
        "scale": scale_table(points),
    }
