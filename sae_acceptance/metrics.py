"""Pooled sums -> metric values, exactly as `docs/metrics.md` defines them.

Every function here is pure and vectorised over leading axes: the same code
turns the eval set's totals into point estimates and a [resamples] stack of
bootstrap totals into bootstrap distributions. A ratio metric is always a
ratio of (resampled) sums, never a mean of ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Per-sequence scalar sums the engine produces (all float64, shape [n_seq]).
SUM_NAMES = (
    "n_tokens",  # counted positions (reconstruction metrics, KL)
    "n_loss",  # counted next-token loss positions
    "ce_orig",  # Σ next-token CE, unpatched
    "ce_recon",  # Σ CE with the reconstruction spliced in
    "ce_ablate",  # Σ CE with the hookpoint zero-ablated
    "kl_recon",  # Σ KL(p_orig || p_recon)
    "kl_ablate",  # Σ KL(p_orig || p_ablate)
    "cos",  # Σ cos(a, â) (0 where â = 0)
    "rel_err",  # Σ ‖a − â‖ / ‖a‖
    "sq_err",  # Σ ‖a − â‖²  (SSE)
    "act_sq",  # Σ ‖a − c‖²  (c: the engine's fixed shift, for a stable SST)
    "l2_ratio",  # Σ ‖â‖ / ‖a‖
    "l0",  # Σ nonzero latents
)
# Sums of the diagnostics (`[eval] diagnostics`), present where their part ran.
DIAGNOSTIC_SUMS = (
    "ce_random",  # Σ CE with the error turned to a random direction of the same norm
    "kl_random",  # Σ KL(p_orig || p_random)
    "g_delta",  # Σ g·δ  (g: ∂L/∂a, δ = â − a)
    "ga_num",  # Σ (g·δ)²
    "ga_den",  # Σ ‖g‖² ‖δ‖²
    "x_sq",  # Σ ‖a‖²
    "x_norm",  # Σ ‖a‖
    "recon_norm",  # Σ ‖â‖
    "recon_sq",  # Σ ‖â‖²
    "dot",  # Σ a·â
    "l1",  # Σ Σ_i z_i  (signed, as SAEBench sums it)
    "ev_legacy",  # Σ 1 − ‖a − â‖² / ‖a − ā_batch‖²  (SAEBench's legacy explained variance, per token)
)


@dataclass(frozen=True)
class MetricSpec:
    """What the gate needs to know about a metric: its range, direction, interval."""

    name: str
    lo: float
    hi: float
    higher_is_better: bool | None  # None: no direction (reported, never regressed on)
    has_ci: bool = True
    gateable: bool = True
    tolerance: float = 0.0  # default allowed worsening against a baseline, in the metric's units
    needs: tuple[str, ...] = ()  # the per-sequence sums it is computed from (with n_tokens, n_loss)
    part: str | None = None  # the `[eval] diagnostics` part that measures it (None: the gate's own)


INF = math.inf
METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec("ce_rec", -INF, INF, True, tolerance=0.01, needs=("ce_recon", "ce_orig")),
        MetricSpec("ce_loss_score", -INF, INF, True, tolerance=0.01, needs=("ce_ablate", "ce_recon", "ce_orig")),
        MetricSpec("delta_ce", -INF, INF, False, tolerance=0.01, needs=("ce_recon", "ce_orig")),
        MetricSpec("ce_orig", 0, INF, None, needs=("ce_orig",)),
        MetricSpec("ce_recon", 0, INF, False, tolerance=0.01, needs=("ce_recon",)),
        MetricSpec("ce_ablate", 0, INF, None, needs=("ce_ablate",)),
        MetricSpec("kl_div", 0, INF, False, tolerance=0.01, needs=("kl_recon",)),
        MetricSpec("kl_div_score", -INF, INF, True, tolerance=0.01, needs=("kl_ablate", "kl_recon")),
        MetricSpec("kl_ablate", 0, INF, None, needs=("kl_ablate",)),
        MetricSpec("cosine", -1, 1, True, tolerance=0.005, needs=("cos",)),
        MetricSpec("rel_error", 0, INF, False, tolerance=0.005, needs=("rel_err",)),
        MetricSpec("mse_mean", 0, INF, False, needs=("sq_err",)),
        MetricSpec("mse_sum", 0, INF, False, needs=("sq_err",)),
        MetricSpec("r2", -INF, 1, None, gateable=False, needs=("sq_err", "act_sq")),
        MetricSpec("sse_per_token", 0, INF, None, needs=("sq_err",)),
        MetricSpec("sst_per_token", 0, INF, None, needs=("act_sq",)),
        MetricSpec("l2_ratio", 0, INF, None, needs=("l2_ratio",)),
        MetricSpec("l0", 0, INF, None, needs=("l0",)),
        MetricSpec("alive_frac", 0, 1, True, has_ci=False, tolerance=0.02),
        MetricSpec("dead_frac", 0, 1, False, has_ci=False, tolerance=0.02),
        MetricSpec("dense_frac", 0, 1, False, has_ci=False, tolerance=0.01),
        MetricSpec("rate_bits", 0, INF, None, has_ci=False),
        # why: the error against a random direction of its size, and against the loss gradient
        MetricSpec("ce_random", 0, INF, None, needs=("ce_random",), part="random"),
        MetricSpec("kl_random", 0, INF, None, needs=("kl_random",), part="random"),
        MetricSpec("error_kl_ratio", 0, INF, False, tolerance=0.05, needs=("kl_random",), part="random"),
        MetricSpec("grad_alignment", 0, INF, False, tolerance=0.05, needs=("ga_num", "ga_den"), part="gradient"),
        MetricSpec("delta_ce_linear", -INF, INF, None, needs=("g_delta",), part="gradient"),
        # SAEBench's core numbers
        MetricSpec("relative_reconstruction_bias", -INF, INF, None, needs=("recon_sq", "dot"), part="saebench"),
        MetricSpec("l1", -INF, INF, None, needs=("l1",), part="saebench"),
        MetricSpec("l2_norm_in", 0, INF, None, needs=("x_norm",), part="saebench"),
        MetricSpec("l2_norm_out", 0, INF, None, needs=("recon_norm",), part="saebench"),
        MetricSpec("explained_variance", -INF, INF, None, gateable=False, needs=("x_sq",), part="saebench"),
        MetricSpec("explained_variance_legacy", -INF, 1, None, gateable=False, needs=("ev_legacy",), part="saebench"),
        MetricSpec("freq_over_1_percent", 0, 1, None, has_ci=False, part="saebench"),
        MetricSpec("freq_over_10_percent", 0, 1, None, has_ci=False, part="saebench"),
        MetricSpec("normalized_freq_over_1_percent", 0, 1, None, has_ci=False, part="saebench"),
        MetricSpec("normalized_freq_over_10_percent", 0, 1, None, has_ci=False, part="saebench"),
        MetricSpec("max_decoder_cosine", -1, 1, False, has_ci=False, tolerance=0.01, part="saebench"),
        MetricSpec("max_encoder_cosine", -1, 1, None, has_ci=False, part="saebench"),
        MetricSpec("duplicate_frac", 0, 1, False, has_ci=False, tolerance=0.01, part="saebench"),
    )
}
# What a splice measures: the joint patched loss (no reconstruction is compared to one activation).
SPLICE_METRICS = ("ce_rec", "ce_loss_score", "delta_ce", "ce_orig", "ce_recon", "ce_ablate", "kl_div", "kl_div_score")
R2_REFUSAL = (
    "is never an acceptance test: it is variance-normalised and inflated where the PR "
    "canyon flags the layer; gate on ce_rec, cosine or rel_error instead"
)
VARIANCE_NORMALISED = ("r2", "explained_variance", "explained_variance_legacy")
# A latent whose decoder direction is this close (cosine) to another's counts as a duplicate.
DUPLICATE_COSINE = 0.9


def interval_metrics(sums: set[str] | frozenset[str]) -> list[str]:
    """The metrics with an interval that per-sequence `sums` of these names give, in METRICS order."""
    return [m for m, spec in METRICS.items() if spec.has_ci and set(spec.needs) <= sums]


def is_loss_metric(name: str) -> bool:
    """A behavioural metric: its failure message says what the loss did."""
    return name.startswith(("ce_", "delta_ce", "kl_"))


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num/den with NaN (not an exception, not a made-up number) where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def pooled_metrics(totals: dict[str, np.ndarray | float], shift_sum_sq: np.ndarray, d_in: int) -> dict[str, np.ndarray]:
    """Totals (point: [()], bootstrap: [B]) -> every metric with an interval.

    `shift_sum_sq` is ‖Σ(a − c)‖², so SST = Σ‖a − c‖² − ‖Σ(a − c)‖²/N: mean-centred
    over the whole (resampled) set, and stable because c is near the mean.
    """
    totals = {**dict.fromkeys((*SUM_NAMES, *DIAGNOSTIC_SUMS), np.nan), **totals}  # only the sums that ran
    n, n_loss = totals["n_tokens"], totals["n_loss"]
    ce_orig = _ratio(totals["ce_orig"], n_loss)
    ce_recon = _ratio(totals["ce_recon"], n_loss)
    ce_ablate = _ratio(totals["ce_ablate"], n_loss)
    kl_recon = _ratio(totals["kl_recon"], n)
    sse = totals["sq_err"]
    sst = totals["act_sq"] - _ratio(shift_sum_sq, n)
    return {
        "ce_orig": ce_orig,
        "ce_recon": ce_recon,
        "ce_ablate": ce_ablate,
        "ce_rec": 2.0 - _ratio(totals["ce_recon"], totals["ce_orig"]),
        "ce_loss_score": _ratio(totals["ce_ablate"] - totals["ce_recon"], totals["ce_ablate"] - totals["ce_orig"]),
        "delta_ce": ce_recon - ce_orig,
        "kl_div": kl_recon,
        "kl_div_score": _ratio(totals["kl_ablate"] - totals["kl_recon"], totals["kl_ablate"]),
        "kl_ablate": _ratio(totals["kl_ablate"], n),
        "cosine": _ratio(totals["cos"], n),
        "rel_error": _ratio(totals["rel_err"], n),
        "mse_mean": _ratio(sse, n * d_in),
        "mse_sum": _ratio(sse, n),
        "r2": 1.0 - _ratio(sse, sst),
        "sse_per_token": _ratio(sse, n),
        "sst_per_token": _ratio(sst, n),
        "l2_ratio": _ratio(totals["l2_ratio"], n),
        "l0": _ratio(totals["l0"], n),
        "ce_random": _ratio(totals["ce_random"], n_loss),
        "kl_random": _ratio(totals["kl_random"], n),
        "error_kl_ratio": _ratio(totals["kl_recon"], totals["kl_random"]),
        "grad_alignment": d_in * _ratio(totals["ga_num"], totals["ga_den"]),
        "delta_ce_linear": _ratio(totals["g_delta"], n_loss),
        "relative_reconstruction_bias": _ratio(totals["recon_sq"], totals["dot"]),
        "l1": _ratio(totals["l1"], n),
        "l2_norm_in": _ratio(totals["x_norm"], n),
        "l2_norm_out": _ratio(totals["recon_norm"], n),
        "explained_variance": 1.0 - _ratio(_ratio(sse, n), _saebench_variance(_ratio(totals["x_sq"], n), d_in)),
        "explained_variance_legacy": _ratio(totals["ev_legacy"], n),
    }


def _saebench_variance(mean_sq: np.ndarray, d_in: int) -> np.ndarray:
    """SAEBench 0.6.0's total variance, E‖x‖² − (E‖x‖²/d)²: not the variance about the mean (a
    known slip of its core eval, kept so `explained_variance` is SAEBench's number)."""
    return mean_sq - (mean_sq / d_in) ** 2


def alive_fraction(fired: np.ndarray) -> float:
    """Share of latents that fired on at least one counted token."""
    return float((fired > 0).mean()) if fired.size else math.nan


def latent_densities(fired: np.ndarray, n_tokens: float) -> np.ndarray:
    """Each latent's firing rate: the share of counted tokens it is nonzero on."""
    return fired.astype(np.float64) / n_tokens if n_tokens > 0 else np.full(fired.shape, np.nan)


def dead_fraction(fired: np.ndarray) -> float:
    """Share of latents that fired on no counted token (1 − alive_frac)."""
    return float((fired == 0).mean()) if fired.size else math.nan


def dense_fraction(fired: np.ndarray, n_tokens: float, threshold: float) -> float:
    """Share of latents firing on more than `threshold` of the counted tokens."""
    if not fired.size or n_tokens <= 0:
        return math.nan
    return float((latent_densities(fired, n_tokens) > threshold).mean())


def freq_over(fired: np.ndarray, n_tokens: float, threshold: float) -> float:
    """Share of latents firing on more than `threshold` of the counted tokens (SAEBench's
    `freq_over_*_percent`; the same count as `dense_fraction`)."""
    return dense_fraction(fired, n_tokens, threshold)


def normalized_freq_over(fired: np.ndarray, n_tokens: float, threshold: float) -> float:
    """The share of all firing that latents denser than `threshold` account for (0 when none fires)."""
    density = latent_densities(fired, n_tokens)
    total = float(np.nansum(density))
    return float(density[density > threshold].sum() / total) if total > 0 else 0.0


def rate_bits(fired: np.ndarray, n_tokens: float, value_bits: float = 8.0) -> float:
    """Bits/token of a sparse code: entropy-coded indices plus fixed-point values.

    p_i is latent i's share of all active slots; the index cost is Σ_i c_i·(−log2 p_i)
    spread over the tokens, the value cost `value_bits · l0`. Not mutual information.
    """
    total = float(fired.sum())
    if n_tokens <= 0:
        return math.nan
    if total == 0:
        return 0.0
    counts = fired[fired > 0].astype(np.float64)
    index_bits = float(-(counts * np.log2(counts / total)).sum())
    return (index_bits + value_bits * total) / n_tokens
