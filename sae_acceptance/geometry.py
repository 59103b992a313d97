"""Participation ratio per layer and the PR-canyon rule.

The canyon is where the residual stream's covariance collapses onto a few
directions. There R² is inflated by a variance scale the model may ignore, so the
gate reports R² as a warning (`R2ProxyWarning`) instead of trusting it. PR is a
diagnostic label for a layer, never an acceptance test.

Covariances accumulate in float64 on the activations' device: d² × 8 bytes per
hook (pythia-410m: 8 MiB a layer, about 200 MiB for all 24 layers).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_acceptance.errors import ConfigError, SourceError
from sae_acceptance.sources.model import hook_layer

__all__ = [
    "CanyonRule",
    "CovarianceAccumulator",
    "LayerGeometry",
    "format_profile_table",
    "hook_layer",
    "participation_ratio",
    "plot_pr_profile",
    "pr_from_covariance",
    "pr_profile",
    "profile_to_json",
]


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

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's rows (another worker, another shard); returns self."""
        if other.d != self.d:
            raise ValueError(f"cannot merge width {other.d} into width {self.d}")
        if other.shift is None:
            return self
        o_shift, o_sum, o_outer = (t.to(self.device) for t in (other.shift, other.sum, other.outer))
        if self.shift is None:
            self.shift = o_shift.clone()
        # Rows y in other's frame: y − shift = (y − o_shift) + delta.
        delta = o_shift - self.shift
        w = other.weight
        self.outer += o_outer + torch.outer(o_sum, delta) + torch.outer(delta, o_sum)
        self.outer += w * torch.outer(delta, delta)
        self.sum += o_sum + w * delta
        self.count += other.count
        self.weight += w
        return self

    def _check(self) -> None:
        if self.weight == 0.0:
            raise ValueError("no rows accumulated: every position was excluded")

    def mean(self) -> np.ndarray:
        """Weighted mean of the rows, float64 [d]."""
        self._check()
        return (self.shift + self.sum / self.weight).cpu().numpy()

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

    The seed's points: 70M L3 (0.008), 410M L5 (0.002), L12 (0.001) are flagged at
    0.02; 70M L1 (0.101) and 410M L4 (0.109) are not. PR ≥ 1 always, so pr_ratio
    ≥ 1/d_model: below d_model = 1/threshold (50 by default) no layer can be flagged.
    """

    threshold: float = 0.02
    use: Literal["raw", "deflated"] = "raw"

    def __post_init__(self) -> None:
        if self.use not in ("raw", "deflated"):
            raise ConfigError(f"canyon rule: use must be 'raw' or 'deflated', not {self.use!r}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"canyon rule: threshold must be in (0, 1), not {self.threshold}")

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

    @property
    def pr_ratio_deflated(self) -> float:
        return self.pr_deflated / self.d_model

    @classmethod
    def measure(
        cls, hook: str, layer: int | None, cov: np.ndarray, rule: CanyonRule = CanyonRule()
    ) -> LayerGeometry:
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
            "pr": _finite(self.pr),
            "pr_deflated": _finite(self.pr_deflated),
            "pr_ratio": _finite(self.pr_ratio),
            "canyon": self.canyon,
        }


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
    """PR of `blocks.L.hook_{hook_type}` per layer, over the counted positions of `tokens`.

    model: a HookedTransformer. tokens: [n_seq, ctx] token ids. counted: [n_seq, ctx]
    bool, False at positions left out (special tokens); all True by default.
    One `run_with_cache` pass per batch, stopped after the deepest requested layer.
    Memory: one d² float64 covariance per layer on the model's device (pythia-410m:
    8 MiB a layer, ≈ 200 MiB for 24), plus the batch's cached activations.
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    if not layers or not all(0 <= layer < n_layers for layer in layers):
        raise SourceError(f"layers must be in 0..{n_layers - 1}, got {layers}")
    names = {layer: f"blocks.{layer}.hook_{hook_type}" for layer in layers}
    for name in names.values():
        if name not in model.hook_dict:
            valid = sorted(
                {
                    h.split(".", 2)[2].removeprefix("hook_")
                    for h in model.hook_dict
                    if h.startswith("blocks.0.hook_")
                }
            )
            close = difflib.get_close_matches(hook_type, valid, n=3)
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else f"; block-level hook types: {', '.join(valid)}"
            )
            raise SourceError(f"hook type {hook_type!r}: the model has no {name}{hint}")
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise SourceError(f"tokens must be [n_seq, ctx], got shape {tuple(tokens.shape)}")
    counted = (
        torch.ones_like(tokens, dtype=torch.bool) if counted is None else torch.as_tensor(counted)
    )
    if counted.shape != tokens.shape:
        raise SourceError(
            f"counted mask {tuple(counted.shape)} does not match tokens {tuple(tokens.shape)}"
        )
    if not bool(counted.any()):
        raise SourceError("no counted token: every position is excluded")

    device = model.cfg.device
    accumulators: dict[int, CovarianceAccumulator] = {}
    batches = range(0, tokens.shape[0], batch_size)
    with torch.inference_mode():
        for begin in tqdm(
            batches, desc=f"pr-profile {hook_type}", unit="batch", disable=not progress
        ):
            mask = counted[begin : begin + batch_size]
            if not bool(mask.any()):
                continue
            tok = tokens[begin : begin + batch_size].to(device)
            _, cache = model.run_with_cache(
                tok, names_filter=list(names.values()), stop_at_layer=layers[-1] + 1
            )
            for layer, name in names.items():
                act = cache[name].flatten(2)  # [batch, pos, width]; heads flattened if any
                acc = accumulators.get(layer)
                if acc is None:
                    acc = accumulators[layer] = CovarianceAccumulator(act.shape[-1], act.device)
                acc.update(act, mask.to(act.device))
            del cache
    return [
        LayerGeometry.measure(name, layer, accumulators[layer].covariance(), rule)
        for layer, name in names.items()
    ]


def _hook_type(hook: str) -> str:
    """`blocks.3.hook_resid_post` -> `resid_post`."""
    return hook.split(".", 2)[-1].removeprefix("hook_")


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined PR is written as null."""
    return float(value) if math.isfinite(value) else None


def profile_to_json(
    model_name: str,
    profile: list[LayerGeometry],
    rule: CanyonRule | None = None,
    hook_type: str | None = None,
) -> dict[str, Any]:
    """The `pr-profile` JSON; rule and hook type default to those the profile was measured with."""
    if not profile:
        raise ValueError("empty profile")
    rule = profile[0].rule if rule is None else rule
    hook_type = _hook_type(profile[0].hook) if hook_type is None else hook_type
    return {
        "model": model_name,
        "hook_type": hook_type,
        "rule": {"threshold": rule.threshold, "use": rule.use},
        "layers": [
            {key: value for key, value in g.to_dict().items() if key != "d_model"}
            for g in profile
        ],
    }


def format_profile_table(profile: list[LayerGeometry]) -> str:
    """Plain-text table for the CLI."""
    lines = [f"{'layer':>5}  {'pr':>10}  {'pr_deflated':>11}  {'pr_ratio':>8}  canyon"]
    for g in profile:
        layer = "-" if g.layer is None else str(g.layer)
        canyon = "yes" if g.canyon else "no"
        lines.append(
            f"{layer:>5}  {g.pr:>10.3f}  {g.pr_deflated:>11.3f}  {g.pr_ratio:>8.4f}  {canyon}"
        )
    return "\n".join(lines)


def plot_pr_profile(
    profile: list[LayerGeometry],
    path: str | Path,
    rule: CanyonRule | None = None,
    title: str | None = None,
) -> Path:
    """PR (log scale) against depth, raw and deflated, with the canyon band shaded; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not profile:
        raise ValueError("empty profile")
    rule = profile[0].rule if rule is None else rule
    xs = [i if g.layer is None else g.layer for i, g in enumerate(profile)]
    d = profile[0].d_model
    raw = [g.pr for g in profile]
    deflated = [g.pr_deflated for g in profile]
    band = rule.threshold * d
    floor = min(0.7, 0.7 * band)  # PR ≥ 1 always; keep the band visible when threshold·d < 1

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    which = "PR" if rule.use == "raw" else "deflated PR"
    ax.axhspan(
        floor,
        band,
        color="tab:red",
        alpha=0.12,
        lw=0,
        label=f"canyon: {which} < {rule.threshold:g}·d_model ({band:.3g})",
    )
    ax.axhline(band, color="tab:red", lw=0.8, ls=":")
    ax.plot(xs, raw, "o-", color="tab:blue", label="raw PR")
    ax.plot(xs, deflated, "s--", color="tab:green", label="deflated PR (top direction removed)")
    flagged = [
        (x, r if rule.use == "raw" else f)
        for x, r, f, g in zip(xs, raw, deflated, profile, strict=True)
        if g.canyon
    ]
    if flagged:
        fx, fy = zip(*flagged, strict=True)
        ax.scatter(
            fx,
            fy,
            s=160,
            facecolors="none",
            edgecolors="tab:red",
            linewidths=2,
            zorder=3,
            label="flagged layer",
        )
    ax.set_yscale("log")
    ax.set_ylim(floor, d * 1.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("participation ratio")
    ax.secondary_yaxis("right", functions=(lambda p: p / d, lambda r: r * d)).set_ylabel(
        "PR / d_model"
    )
    ax.set_xticks(xs)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title or "participation ratio by depth")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
