"""Decisions: a bound applied to a metric, an item's outcome, and the R² canyon warning.

Every pass/fail the plugin, the CLI and the reports show comes from `judge` (one
bound, one number) and `outcome` (that verdict read against the entry's
negative controls). A NaN or infinite metric fails, even where a failure was
expected. A bound checked on the point estimate whose interval straddles it
passes or fails by the point, and says that it straddles.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

from sae_acceptance.config import Bound
from sae_acceptance.io import finite_or_none


@dataclass(frozen=True)
class MetricValue:
    value: float
    ci: tuple[float, float] | None = None

    def format(self) -> str:
        if self.ci is None:
            return f"{self.value:.4g}"
        return f"{self.value:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}]"

    def to_dict(self) -> dict:
        return {
            "value": finite_or_none(self.value),
            "ci": None if self.ci is None else [finite_or_none(c) for c in self.ci],
        }


@dataclass(frozen=True)
class Verdict:
    metric: str
    passed: bool
    message: str
    bound: dict
    checked: float
    straddles: bool = False

    @property
    def finite(self) -> bool:
        """False when the checked number is NaN or infinite: a failed eval, whatever was expected."""
        return math.isfinite(self.checked)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["checked"] = finite_or_none(self.checked)
        return out


def checked_value(metric: MetricValue, bound: Bound) -> float:
    """The number the bound applies to: the point, or one end of the interval."""
    if bound.on == "point":
        return metric.value
    if metric.ci is None:
        return math.nan
    return metric.ci[0] if bound.on == "ci_low" else metric.ci[1]


def judge(name: str, metric: MetricValue, bound: Bound, context: str = "") -> Verdict:
    """Apply one bound. `context` (e.g. the loss change) is appended to the message."""
    value = checked_value(metric, bound)
    where = f" (on {bound.on})"
    bound_dict = bound.model_dump(exclude_none=True)
    if not math.isfinite(value):
        what = "its interval" if bound.on != "point" else "the metric"
        return Verdict(
            name, False, f"{name} is {value} ({what} is not finite): a failed eval, not a number", bound_dict, value
        )
    failures = []
    if bound.min is not None and value < bound.min:
        failures.append(f"{name} {metric.format()} < {bound.min:g}{where}")
    if bound.max is not None and value > bound.max:
        failures.append(f"{name} {metric.format()} > {bound.max:g}{where}")
    straddles = (
        bound.on == "point"
        and metric.ci is not None
        and any(limit is not None and metric.ci[0] < limit < metric.ci[1] for limit in (bound.min, bound.max))
    )
    if failures:
        message = "; ".join(failures)
    else:
        limits = []
        if bound.min is not None:
            limits.append(f">= {bound.min:g}")
        if bound.max is not None:
            limits.append(f"<= {bound.max:g}")
        message = f"{name} {metric.format()} {' and '.join(limits)}{where}"
    if straddles:
        message += "; the interval straddles the bound"
    if context:
        message += f"; {context}"
    return Verdict(name, not failures, message, bound_dict, value, straddles)


def loss_context(metrics: dict[str, MetricValue]) -> str:
    """'loss 3.21 -> 4.45 nats (+38.6%)': what a behavioural failure means in the model's units."""
    orig, recon = metrics.get("ce_orig"), metrics.get("ce_recon")
    if orig is None or recon is None or not orig.value:
        return ""
    change = 100.0 * (recon.value - orig.value) / orig.value
    return f"loss {orig.value:.2f} -> {recon.value:.2f} nats ({change:+.1f}%)"


class Status(enum.Enum):
    """What one gated item came to. `as_expected` is what a gate's exit status reads."""

    PASSED = "passed"
    FAILED = "failed"
    CAUGHT = "caught"  # a negative control failed, as it must (pytest: xfail)
    MISSED = "missed"  # a negative control passed: the gate no longer catches it
    BROKEN = "broken"  # the checked number is NaN or infinite

    @property
    def as_expected(self) -> bool:
        return self in (Status.PASSED, Status.CAUGHT)


@dataclass(frozen=True)
class Outcome:
    status: Status
    message: str

    @property
    def as_expected(self) -> bool:
        return self.status.as_expected


def outcome(verdict: Verdict, control: bool) -> Outcome:
    """A verdict read against the entry: `control` when the metric is in its `expect_fail`."""
    if not verdict.finite:
        return Outcome(Status.BROKEN, verdict.message)
    if control:
        if verdict.passed:
            return Outcome(Status.MISSED, f"negative control passed, the gate no longer catches it: {verdict.message}")
        return Outcome(Status.CAUGHT, f"negative control caught: {verdict.message}")
    return Outcome(Status.PASSED if verdict.passed else Status.FAILED, verdict.message)


def canyon_warning(sae: str, r2: float, hook: str, pr: float, pr_ratio: float, threshold: float) -> str:
    """The R² warning where the PR canyon flags the SAE's layer (callers check the flag)."""
    return (
        f"{sae}: r2 = {r2:.3f} at {hook}, a layer the PR canyon flags "
        f"(pr = {pr:.3g}, pr_ratio = {pr_ratio:.4f} < {threshold}): "
        "R² is variance-normalised and likely inflated here; judge by ce_rec, cosine and rel_error"
    )
