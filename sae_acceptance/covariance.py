"""Streaming covariance of activations in float64: what the PR of a layer is computed from.

Covariances accumulate on the activations' device: d² × 8 bytes per hook
(pythia-410m: 8 MiB a layer, about 200 MiB for all 24 layers).
"""

from __future__ import annotations

import numpy as np
import torch


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
