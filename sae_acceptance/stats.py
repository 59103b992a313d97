"""Bootstrap over sequences, from per-sequence sums, vectorised.

A resample is a vector of counts (how often each sequence was drawn); pooled
totals of every sum for every resample are then one matrix product, and every
metric is recomputed from resampled totals by the same functions that give the
point estimate. The paired bootstrap applies the same counts to two runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sae_acceptance.errors import ConfigError
from sae_acceptance.metrics import interval_metrics, pooled_metrics


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are drawn; the defaults live in `config.EvalSettings` and the report records them."""

    resamples: int
    confidence: float
    seed: int


@dataclass
class SequenceSums:
    """Per-sequence float64 sums of one SAE over the eval set: all any metric needs.

    `scalars[name]` is [n_seq] (names in `metrics.SUM_NAMES`); `fired` is
    [d_sae], tokens each latent fired on (global: alive_frac and rate_bits carry
    no interval); `d_in` is the activation width. `shift_sums` is [n_seq, d_in],
    Σ_t (a_t − c) per sequence, needed only for the mean-centred SST (`r2`,
    `sst_per_token`); where it is not kept (a stored baseline) those two are NaN.
    """

    scalars: dict[str, np.ndarray]
    fired: np.ndarray
    d_in: int
    shift_sums: np.ndarray | None = None

    @property
    def n_sequences(self) -> int:
        """Number of sequences summed."""
        return len(self.scalars["n_tokens"])

    def metrics(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Metrics pooled with sequence `weights` ([n_seq] or [B, n_seq]; None: all once)."""
        if weights is None:
            weights = np.ones(self.n_sequences)
        totals = {name: weights @ values for name, values in self.scalars.items()}
        if self.shift_sums is None:
            shift_sum_sq = np.full(weights.shape[:-1], np.nan)
        else:
            shift_total = weights @ self.shift_sums
            shift_sum_sq = np.einsum("...d,...d->...", shift_total, shift_total)
        computed = pooled_metrics(totals, shift_sum_sq, self.d_in)
        return {name: computed[name] for name in interval_metrics(set(self.scalars))}


def bootstrap_bytes(n_sequences: int, resamples: int) -> int:
    """Peak bytes `resample_counts` allocates: the draws, the draws offset per resample, their
    counts and the float copy, each [resamples, n_sequences] of 8 bytes."""
    return 4 * 8 * resamples * n_sequences


def available_memory() -> int:
    """Bytes of memory this process can still have: psutil's `available` (free memory plus the
    cache the system can reclaim; the free pages alone would refuse settings that fit)."""
    import psutil  # lazy: only the start of an evaluation asks

    return int(psutil.virtual_memory().available)


def check_bootstrap_fits(n_sequences: int, resamples: int, where: str) -> None:
    """Refuse, before anything is evaluated, a bootstrap whose resample matrix cannot fit in
    memory: one line naming the setting, not "out of memory" after the evaluation."""
    needed, available = bootstrap_bytes(n_sequences, resamples), available_memory()
    if needed > available:
        raise ConfigError(
            f"{where}: [eval] bootstrap_resamples = {resamples:,} over {n_sequences:,} sequences needs about "
            f"{needed / 1e9:,.1f} GB, more than the {available / 1e9:,.1f} GB of memory available; lower it"
        )


def resample_counts(n: int, settings: BootstrapSettings) -> np.ndarray:
    """[resamples, n] draw counts of a seeded bootstrap over n sequences."""
    rng = np.random.default_rng(settings.seed)
    draws = rng.integers(0, n, size=(settings.resamples, n))
    offsets = (np.arange(settings.resamples) * n)[:, None]
    return (
        np.bincount((draws + offsets).ravel(), minlength=settings.resamples * n)
        .reshape(settings.resamples, n)
        .astype(np.float64)
    )


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution; NaN when any resample is NaN."""
    if not np.all(np.isfinite(samples)):
        return (float("nan"), float("nan"))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_intervals(
    sums: SequenceSums, settings: BootstrapSettings, counts: np.ndarray | None = None
) -> dict[str, tuple[float, float]]:
    """Every interval-carrying metric's percentile interval, from one resample matrix."""
    counts = resample_counts(sums.n_sequences, settings) if counts is None else counts
    dist = sums.metrics(counts)
    return {name: percentile_interval(values, settings.confidence) for name, values in dist.items()}


@dataclass(frozen=True)
class PairedChange:
    """Change of a metric (candidate − baseline) on the same sequences, with its interval."""

    change: float
    ci: tuple[float, float]


def paired_changes(
    candidate: SequenceSums, baseline: SequenceSums, settings: BootstrapSettings
) -> dict[str, PairedChange]:
    """Paired bootstrap: resample sequence indices once and apply them to both runs."""
    if candidate.n_sequences != baseline.n_sequences:
        raise ValueError(
            f"paired comparison needs the same sequences: {candidate.n_sequences} vs {baseline.n_sequences}"
        )
    counts = resample_counts(candidate.n_sequences, settings)
    point_c, point_b = candidate.metrics(), baseline.metrics()
    dist_c, dist_b = candidate.metrics(counts), baseline.metrics(counts)
    return {
        name: PairedChange(
            float(point_c[name] - point_b[name]),
            percentile_interval(dist_c[name] - dist_b[name], settings.confidence),
        )
        for name in point_c
        if name in point_b  # a baseline written before a diagnostic existed lacks its sums
    }
