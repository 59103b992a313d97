"""Covariance, participation ratio and the PR-canyon rule: the maths, no model.

The canyon is where the residual stream's covariance collapses onto a few
directions. There R² is inflated by a variance scale the model may ignore, so the
gate reports R² as a warning (`R2ProxyWarning`) instead of trusting it. PR is a
diagnostic label for a layer, never an acceptance test.

Covariances accumulate in float64 on the activations' device: d² × 8 bytes per
hook (pythia-410m: 8 MiB a layer, about 200 MiB for all 24 layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from sae_acceptance.config import CanyonSettings, describe
from sae_acceptance.errors import ConfigError
from sae_acceptance.io import finite_or_none

__all__ = [
    "CanyonRule",
    "CovarianceAccumulator",
    "LayerGeometry",
    "participation_ratio",
    "pr_from_covariance",
]

_CANYON = CanyonSettings()  # the rule's defaults live in the thresholds schema


def _float64_device(device: torch.device | str | None) -> torch.device:
    """MPS has no float64: accumulate on the CPU there."""
    device = torch.device("cpu" if device is None else device)
    return torch.device("cpu") if device.type == "mps" else device


class CovarianceAccumulator:
    """Streaming mean-centred (population) covariance of rows of width d, in float64.

    Residual streams carry a large mean (hundreds of times their spread in some
    layers), and Σxxᵀ/n − μμᵀ then cancels away most digits. Rows are therefore
    shifted by a fixed reference (the first non-empty batch's mean) before their
    sums and outer products are taken, and the exact covariance is recovered at
    the end: cov = S/W − m mᵀ with m = Σw(x − shift)/W small.
    """

    def __init__(self, d: int, device: torch.device | str | None = None):
        self.d = d
        self.device = _float64_device(device)
        self.count = 0  # rows accumulated (after the mask)
        self.weight = 0.0  # Σ weights (= count when no weights are given)
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(d, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=self.device)

    def update(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add rows x [..., d]; `mask` [...] (bool) drops rows, `weights` [...] (≥ 0) weighs them."""
        if x.shape[-1] != self.d:
            raise ValueError(f"rows have width {x.shape[-1]}, the accumulator {self.d}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d)
        if weights is not None:
            if weights.shape != lead:
                raise ValueError(f"weights shape {tuple(weights.shape)} != rows {tuple(lead)}")
            weights = weights.reshape(-1).to(self.device, torch.float64)
        if mask is not None:
            if mask.shape != lead:
                raise ValueError(f"mask shape {tuple(mask.shape)} != rows {tuple(lead)}")
            keep = mask.reshape(-1).to(x.device, torch.bool)
            x = x[keep]
            weights = None if weights is None else weights[keep.to(self.device)]
        if x.shape[0] == 0:
            return
        x = x.to(self.device, torch.float64)
        if weights is None:
            total = float(x.shape[0])
        else:
            if bool((weights < 0).any()):
                raise ValueError("weights must be non-negative")
            total = float(weights.sum())
            if total == 0.0:
                return
        if self.shift is None:
            self.shift = x.mean(0) if weights is None else weights @ x / total
        centred = x - self.shift
        if weights is None:
            self.sum += centred.sum(0)
            self.outer += centred.T @ centred
        else:
            self.sum += weights @ centred
            self.outer += (centred * weights[:, None]).T @ centred
        self.count += x.shape[0]
        self.weight += total

    def _check(self) -> None:
        if self.weight == 0.0:
            raise ValueError("no rows accumulated: every position was excluded")

    def covariance(self) -> np.ndarray:
        """Population covariance (divides by Σw, like np.cov(bias=True)), float64 [d, d]."""
        self._check()
        m = self.sum / self.weight
        cov = self.outer / self.weight - torch.outer(m, m)
        return ((cov + cov.T) / 2).cpu().numpy()


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
class CanyonRule:
    """Flag a layer when PR / d_model (raw, or with the top direction removed) is below `threshold`.

    At the default 0.02, pythia-70m's block 3 and pythia-410m's blocks 5 and 12 are
    flagged, their blocks 1 and 4 are not. PR ≥ 1 always, so pr_ratio ≥ 1/d_model:
    below d_model = 1/threshold (50 by default) no layer can be flagged.
    """

    threshold: float = _CANYON.threshold
    use: Literal["raw", "deflated"] = _CANYON.use

    def __post_init__(self) -> None:
        try:
            CanyonSettings(threshold=self.threshold, use=self.use)
        except ValidationError as err:
            raise ConfigError(describe(err, "", "canyon rule")) from None

    @classmethod
    def from_settings(cls, settings: CanyonSettings) -> CanyonRule:
        return cls(settings.threshold, settings.use)

    def flags(self, pr_ratio_raw: float, pr_ratio_deflated: float) -> bool:
        """True when the chosen ratio is below the threshold (NaN is never flagged)."""
        value = pr_ratio_raw if self.use == "raw" else pr_ratio_deflated
        return bool(value < self.threshold)


@dataclass(frozen=True)
class LayerGeometry:
    """PR of one hook's activations and the canyon verdict under `rule`.

    `d_model` is the hook's width (d_model for residual hooks).
    """

    layer: int | None
    hook: str
    d_model: int
    pr: float
    pr_deflated: float
    pr_ratio: float
    canyon: bool
    rule: CanyonRule = field(default=CanyonRule(), repr=False)

    @classmethod
    def measure(cls, hook: str, layer: int | None, cov: np.ndarray, rule: CanyonRule = CanyonRule()) -> LayerGeometry:
        """PR, deflated PR and the canyon flag from a hook's covariance."""
        pr, pr_deflated = pr_from_covariance(cov)
        d = cov.shape[0]
        canyon = rule.flags(pr / d, pr_deflated / d)
        return cls(layer, hook, d, pr, pr_deflated, pr / d, canyon, rule)

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
