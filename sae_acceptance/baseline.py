"""Regression baselines: what was measured, fingerprinted, and a paired test against it.

A baseline (JSON, meant to be committed beside thresholds.toml) keeps, per SAE,
every metric's value and interval and the per-sequence sums that a paired
bootstrap needs. A retrained SAE is compared on the same sequences: resample
the sequence indices once, apply them to both runs' sums. Two unpaired 95%
intervals overlap almost always at 200 sequences; the paired interval of the
change does not, when the change is real.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_acceptance import __version__ as PROJECT_VERSION
from sae_acceptance.errors import BaselineError
from sae_acceptance.io import OutputError, locked, read_json, remove_lock, write_json
from sae_acceptance.metrics import METRICS
from sae_acceptance.results import EvalReport, SAEResult
from sae_acceptance.sources.model import model_identity
from sae_acceptance.stats import BootstrapSettings, SequenceSums, paired_changes

FORMAT = "sae-acceptance-baseline"
FORMAT_VERSION = 2  # 2: sums carry d_in (mse_mean of a baseline was off by d_in in 1)
DEFAULT_TOLERANCES = {
    "ce_rec": 0.01,
    "ce_loss_score": 0.01,
    "delta_ce": 0.01,
    "ce_recon": 0.01,
    "kl_div": 0.01,
    "kl_div_score": 0.01,
    "cosine": 0.005,
    "rel_error": 0.005,
    "alive_frac": 0.02,
}
# What must match for a comparison to mean anything; the rest is recorded for the reader.
MUST_MATCH = ("tokens", "model", "hook", "dtype", "excluded_ids", "n_sequences")


def run_identity(result: SAEResult, settings: dict[str, Any]) -> dict[str, Any]:
    """What the SAE was measured on (stored as an entry's "fingerprint")."""
    return {
        "tokens": result.tokens_fingerprint,
        "model": model_identity(result.model),
        "hook": result.hook,
        "dtype": settings.get("dtype"),
        "excluded_ids": result.excluded_ids,
        "n_sequences": settings.get("n_sequences"),
        "context_size": settings.get("context_size"),
        "bootstrap": settings.get("bootstrap"),
        "project_version": PROJECT_VERSION,
    }


def entry_for(result: SAEResult, settings: dict[str, Any]) -> dict[str, Any]:
    sums = result.sums
    return {
        "fingerprint": run_identity(result, settings),
        "metrics": {name: m.to_dict() for name, m in result.metrics.items()},
        "sums": {
            "d_in": sums.d_in,
            "scalars": {name: values.tolist() for name, values in sums.scalars.items()},
            "fired": sums.fired.tolist(),
        },
    }


def sums_from_entry(entry: dict[str, Any], where: str) -> SequenceSums:
    try:
        stored = entry["sums"]
        scalars = {name: np.asarray(values, dtype=np.float64) for name, values in stored["scalars"].items()}
        fired = np.asarray(stored["fired"], dtype=np.int64)
        d_in = int(stored["d_in"])
    except (KeyError, TypeError, ValueError) as err:
        raise BaselineError(
            f"{where}: malformed per-sequence sums (missing or bad {err}); refresh with --sae-update-baseline"
        ) from None
    # The activation vector sums are not stored ([n_seq, d_in] each): r2 is never gated,
    # so never regressed on, and comes back NaN from a baseline.
    return SequenceSums(scalars=scalars, fired=fired, d_in=d_in)


@dataclass(frozen=True)
class Baseline:
    """A read baseline file: where it is (for messages) and its per-SAE entries."""

    path: Path
    saes: dict[str, Any]


def load_baseline(path: Path) -> Baseline:
    """Read and check a baseline file; a corrupt or foreign file is one clear error."""
    if not path.exists():
        raise BaselineError(f"{path}: no such baseline (write one with --sae-update-baseline)")
    try:
        payload = read_json(path, "a sae-acceptance baseline")
    except OutputError as err:
        raise BaselineError(str(err)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BaselineError(f"{path}: not a sae-acceptance baseline (no \"format\": \"{FORMAT}\")")
    if payload.get("version") != FORMAT_VERSION:
        raise BaselineError(f"{path}: baseline format version {payload.get('version')}, expected {FORMAT_VERSION}")
    if not isinstance(payload.get("saes"), dict):
        raise BaselineError(f"{path}: no \"saes\" table")
    return Baseline(path, payload["saes"])


def baseline_entries(report: EvalReport) -> dict[str, Any]:
    """The baseline entries of a report's SAEs that were measured (an SAE with an error has none)."""
    return {
        name: entry_for(result, report.settings)
        for name, result in report.saes.items()
        if result.error is None and result.sums is not None
    }


def update_baseline(path: Path, entries: dict[str, Any]) -> Path:
    """Merge `entries` into the baseline at `path` and write it atomically (under a lock)."""
    with locked(path):
        saes: dict[str, Any] = {}
        if path.exists():
            try:
                saes = load_baseline(path).saes
            except BaselineError:
                saes = {}  # refreshing replaces a corrupt file
        saes.update(entries)
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "saes": dict(sorted(saes.items()))}
        written = write_json(path, payload, indent=None)
    remove_lock(path)
    return written


@dataclass(frozen=True)
class RegressionCheck:
    metric: str
    passed: bool
    skipped: bool
    message: str
    change: float = math.nan
    ci: tuple[float, float] | None = None


def compare_sae(
    baseline: Baseline,
    result: SAEResult,
    settings: dict[str, Any],
    tolerances: dict[str, float | None],
    strict: bool = False,
) -> dict[str, RegressionCheck]:
    """Each metric of `tolerances` (None: its default tolerance) against the baseline.

    A metric fails when it is worse than the baseline by more than its tolerance,
    with the whole paired interval of the change beyond the tolerance. One paired
    bootstrap serves every metric of the SAE.
    """
    where = str(baseline.path)
    entry = baseline.saes.get(result.name)
    if entry is None:
        message = f"{result.name}: no baseline entry in {where} (a new SAE)"
        return {m: RegressionCheck(m, not strict, not strict, message) for m in tolerances}
    _check_identity(entry.get("fingerprint", {}), run_identity(result, settings), result.name, where)
    if not isinstance(entry.get("metrics"), dict):
        raise BaselineError(f"{where}: {result.name} has no \"metrics\" table; refresh with --sae-update-baseline")
    for metric in tolerances:
        if METRICS[metric].higher_is_better is None:
            raise BaselineError(f"{metric}: has no direction, cannot be regressed on")
    bootstrap = BootstrapSettings.from_report(settings)
    paired = {}
    if any(METRICS[m].has_ci for m in tolerances):
        paired = paired_changes(result.sums, sums_from_entry(entry, where), bootstrap)
    checks = {}
    for metric, tolerance in tolerances.items():
        before = entry["metrics"].get(metric, {}).get("value")
        if before is None:  # absent, or not finite when the baseline was written (JSON null)
            message = f"{where}: {result.name} has no value for {metric}; refresh with --sae-update-baseline"
            checks[metric] = RegressionCheck(metric, False, False, message)
            continue
        checks[metric] = _check(metric, before, result.metrics[metric].value, paired.get(metric),
                                bootstrap.confidence,
                                DEFAULT_TOLERANCES.get(metric, 0.0) if tolerance is None else tolerance)
    return checks


def _check(metric: str, before: float, after: float, paired, confidence: float, tolerance: float) -> RegressionCheck:
    """One metric's verdict from its values and, where it has an interval, its paired change."""
    spec = METRICS[metric]
    sign = 1.0 if spec.higher_is_better else -1.0
    if spec.has_ci:
        change, ci = paired.change, paired.ci
        worse_low = min(-sign * ci[0], -sign * ci[1])
        interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}] (paired {int(100 * confidence)}% CI)"
    else:
        change, ci = after - before, None
        worse_low = -sign * change
        interval = ""
    worse = -sign * change
    regressed = worse > tolerance and worse_low > tolerance
    if not math.isfinite(change) or (ci is not None and not all(map(math.isfinite, ci))):
        return RegressionCheck(metric, False, False, f"{metric}: the change is not finite", change, ci)
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    message = (
        f"{metric} {before:.4f} -> {after:.4f}: change {change:+.4f}{interval}, "
        f"tolerance {tolerance:g} ({direction})"
    )
    if regressed:
        message = f"regression: {message}"
    return RegressionCheck(metric, not regressed, False, message, change, ci)


def _check_identity(stored: dict[str, Any], current: dict[str, Any], name: str, where: str) -> None:
    differs = [key for key in MUST_MATCH if stored.get(key) != current.get(key)]
    if differs:
        detail = "; ".join(f"{k}: baseline {stored.get(k)!r}, now {current.get(k)!r}" for k in differs)
        raise BaselineError(f"{where}: {name} was measured on something else ({detail}); refresh with --sae-update-baseline")
