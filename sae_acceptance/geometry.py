"""Participation ratio per layer and the PR-canyon rule.

The canyon is where the residual stream's covariance collapses onto a few
directions; there R² is inflated by a variance scale the model may ignore, so
the gate reports R² as a warning (`R2ProxyWarning`) instead of trusting it.
Covariances accumulate in float64 on the model's device: d_model² × 8 bytes per
layer (pythia-410m: 8 MiB a layer, about 200 MiB for all 24).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm


class CovarianceAccumulator:
    """Streaming mean-centred covariance of [n, d] batches, stable under a large mean.

    Rows are shifted by a fixed reference (the first batch's mean) before their
    sums and outer products are taken; the exact covariance is recovered at the end.
    """

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.d = d
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, self.d)
        if mask is not None:
            x = x[mask.reshape(-1)]
        if x.shape[0] == 0:
            return
        x = x.to(device=self.sum.device, dtype=torch.float64)
        if self.shift is None:
            self.shift = x.mean(0)
        centred = x - self.shift
        self.count += x.shape[0]
        self.sum += centred.sum(0)
        self.outer += centred.T @ centred

    def merge(self, other: CovarianceAccumulator) -> None:
        """Add another accumulator's rows (e.g. from another worker)."""
        if other.count == 0:
            return
        if self.shift is None:
            self.shift = other.shift.clone()
        delta = (other.shift - self.shift).to(self.sum.device)
        n = other.count
        self.outer += other.outer.to(self.sum.device) + torch.outer(other.sum, delta) + torch.outer(delta, other.sum)
        self.outer += n * torch.outer(delta, delta)
        self.sum += other.sum.to(self.sum.device) + n * delta
        self.count += n

    def mean(self) -> np.ndarray:
        return (self.shift + self.sum / self.count).cpu().numpy()

    def covariance(self) -> np.ndarray:
        """Population covariance (divides by n), float64 [d, d]."""
        if self.count == 0:
            raise ValueError("no rows accumulated: every position was excluded")
        mean_shifted = self.sum / self.count
        cov = self.outer / self.count - torch.outer(mean_shifted, mean_shifted)
        return cov.cpu().numpy()


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """(Σλ)² / Σλ²: d for an isotropic spectrum, 1 for a rank-one one."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    denominator = float((lam**2).sum())
    return float(lam.sum() ** 2 / denominator) if denominator > 0 else float("nan")


def pr_from_covariance(cov: np.ndarray) -> tuple[float, float]:
    """Raw PR, and PR with the top eigenvalue (the leading direction) removed."""
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1]
    return participation_ratio(lam), participation_ratio(lam[1:])


@dataclass(frozen=True)
class CanyonRule:
    """Flag a layer when pr / d_model (raw or deflated) falls below `threshold`."""

    threshold: float = 0.02
    use: Literal["raw", "deflated"] = "raw"

    def flags(self, pr_ratio: float, pr_ratio_deflated: float) -> bool:
        value = pr_ratio if self.use == "raw" else pr_ratio_deflated
        return bool(value < self.threshold)


@dataclass(frozen=True)
class LayerGeometry:
    layer: int | None
    hook: str
    d_model: int
    pr: float
    pr_deflated: float
    pr_ratio: float
    canyon: bool

    @classmethod
    def measure(cls, hook: str, layer: int | None, cov: np.ndarray, rule: CanyonRule) -> LayerGeometry:
        pr, pr_deflated = pr_from_covariance(cov)
        d = cov.shape[0]
        return cls(layer, hook, d, pr, pr_deflated, pr / d, rule.flags(pr / d, pr_deflated / d))

    def to_dict(self) -> dict:
        return asdict(self)


def pr_profile(
    model,
    tokens: torch.Tensor,
    counted: torch.Tensor | None = None,
    hook_type: str = "resid_post",
    batch_size: int = 8,
    rule: CanyonRule = CanyonRule(),
    layers: list[int] | None = None,
    progress: bool = True,
) -> list[LayerGeometry]:
    """PR of `blocks.L.hook_{hook_type}` for every layer, from one cached pass per batch."""
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    hooks = {f"blocks.{layer}.hook_{hook_type}": layer for layer in layers}
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ValueError(f"hook type {hook_type!r}: the model has no {missing[0]}")
    counted = torch.ones_like(tokens, dtype=torch.bool) if counted is None else counted
    accumulators: dict[str, CovarianceAccumulator] = {}
    batches = range(0, tokens.shape[0], batch_size)
    with torch.inference_mode():
        for begin in tqdm(batches, desc=f"pr-profile {hook_type}", unit="batch", disable=not progress):
            tok = tokens[begin : begin + batch_size].to(model.cfg.device)
            mask = counted[begin : begin + batch_size].to(model.cfg.device)
            _, cache = model.run_with_cache(tok, names_filter=list(hooks), stop_at_layer=max(layers) + 1)
            for hook in hooks:
                act = cache[hook].flatten(2)
                acc = accumulators.setdefault(hook, CovarianceAccumulator(act.shape[-1], act.device))
                acc.update(act, mask)
    return [LayerGeometry.measure(h, layer, accumulators[h].covariance(), rule) for h, layer in hooks.items()]


def profile_to_json(model_name: str, profile: list[LayerGeometry], rule: CanyonRule, hook_type: str) -> dict:
    return {
        "model": model_name,
        "hook_type": hook_type,
        "rule": {"threshold": rule.threshold, "use": rule.use},
        "layers": [
            {k: v for k, v in g.to_dict().items() if k in ("layer", "hook", "pr", "pr_deflated", "pr_ratio", "canyon")}
            for g in profile
        ],
    }


def format_profile_table(profile: list[LayerGeometry]) -> str:
    lines = [f"{'layer':>5}  {'pr':>10}  {'pr_deflated':>11}  {'pr_ratio':>8}  canyon"]
    for g in profile:
        lines.append(
            f"{g.layer:>5}  {g.pr:>10.3f}  {g.pr_deflated:>11.3f}  {g.pr_ratio:>8.4f}  {'yes' if g.canyon else 'no'}"
        )
    return "\n".join(lines)


def plot_pr_profile(profile: list[LayerGeometry], path: str | Path, rule: CanyonRule, title: str | None = None) -> Path:
    """PR (log scale) against depth, raw and deflated, with the canyon band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [g.layer for g in profile]
    d = profile[0].d_model
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhspan(0.5, rule.threshold * d, color="tab:red", alpha=0.12, label=f"canyon: PR < {rule.threshold:g}·d_model")
    ax.plot(layers, [g.pr for g in profile], "o-", label="raw PR")
    ax.plot(layers, [g.pr_deflated for g in profile], "s--", label="deflated PR (top direction removed)")
    flagged = [g for g in profile if g.canyon]
    if flagged:
        ax.scatter([g.layer for g in flagged], [g.pr for g in flagged], s=120, facecolors="none",
                   edgecolors="tab:red", linewidths=2, label="flagged", zorder=3)
    ax.set_yscale("log")
    ax.set_ylim(0.5, d * 1.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("participation ratio")
    ax.set_xticks(layers)
    ax.set_title(title or "participation ratio by depth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
