"""Participation ratio and the PR-canyon flag of a layer: the maths, no model, no torch.

The canyon is where the residual stream's covariance collapses onto a few
directions. There R² is inflated by a variance scale the model may ignore, so the
gate reports R² as a warning (`R2ProxyWarning`) instead of trusting it. PR is a
diagnostic label for a layer, never an acceptance test. The rule itself is
`config.CanyonSettings`; the covariance comes from `covariance.CovarianceAccumulator`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sae_acceptance.config import CanyonSettings
from sae_acceptance.io import finite_or_none

__all__ = ["LayerGeometry", "participation_ratio", "pr_from_covariance"]


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """(Σλ)² / Σλ²: the effective number of directions; d when isotropic, 1 at rank one.

    NaN when every eigenvalue is zero (or none is given): PR is undefined there.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    denominator = float(np.sum(lam**2))
    return float(np.sum(lam) ** 2 / denominator) if denominator > 0 else math.nan


def pr_from_covariance(cov: np.ndarray) -> tuple[float, float]:
    """Raw PR, and PR with the top eigenvalue (the leading direction) removed.

    Tiny negative eigenvalues are round-off of a PSD matrix and are clipped to 0.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square, got shape {cov.shape}")
    if not np.all(np.isfinite(cov)):
        raise ValueError("covariance has NaN or infinite entries (non-finite activations?)")
    lam = np.clip(np.linalg.eigvalsh(cov), 0.0, None)[::-1]  # descending
    return participation_ratio(lam), participation_ratio(lam[1:])


@dataclass(frozen=True)
class LayerGeometry:
    """PR of one hook's activations and the canyon verdict under `canyon`.

    `d_model` is the hook's width (d_model for residual hooks).
    """

    layer: int | None
    hook: str
    d_model: int
    pr: float
    pr_deflated: float
    pr_ratio: float
    canyon: bool
    rule: CanyonSettings = field(default_factory=CanyonSettings, repr=False, compare=False)

    @classmethod
    def measure(cls, hook: str, layer: int | None, cov: np.ndarray, canyon: CanyonSettings) -> LayerGeometry:
        """PR, deflated PR and the canyon flag from a hook's covariance."""
        pr, pr_deflated = pr_from_covariance(cov)
        d = cov.shape[0]
        flagged = canyon.flags(pr / d, pr_deflated / d)
        return cls(layer, hook, d, pr, pr_deflated, pr / d, flagged, canyon)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an undefined PR (no variance left after deflation) is null."""
        return {
            "layer": self.layer,
            "hook": self.hook,
            "d_model": self.d_model,
            "pr": finite_or_none(self.pr),
            "pr_deflated": finite_or_none(self.pr_deflated),
            "pr_ratio": finite_or_none(self.pr_ratio),
            "canyon": self.canyon,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerGeometry:
        """Back from `to_dict` (null is NaN again)."""

        def number(key: str) -> float:
            return math.nan if data.get(key) is None else float(data[key])

        layer = data.get("layer")
        return cls(
            None if layer is None else int(layer),
            str(data["hook"]),
            int(data["d_model"]),
            number("pr"),
            number("pr_deflated"),
            number("pr_ratio"),
            bool(data["canyon"]),
        )
