"""Bounds from the config -> pass / fail, with the message a person reads first.

A NaN or infinite metric fails. A bound checked on the point estimate whose
interval straddles it passes or fails by the point, and says that it straddles.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sae_acceptance.config import Bound


@dataclass(frozen=True)
class MetricValue:
    value: float
    ci: tuple[float, float] | None = None

    def format(self) -> str:
        if self.ci is None:
            return f"{self.value:.4g}"
        return f"{self.value:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}]"

    def to_dict(self) -> dict:
        return {"value": _finite_or_none(self.value), "ci": None if self.ci is None else [_finite_or_none(c) for c in self.ci]}


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
        out["checked"] = _finite_or_none(self.checked)
        return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


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
        return Verdict(name, False, f"{name} is {value} ({what} is not finite): a failed eval, not a number", bound_dict, value)
    failures = []
    if bound.min is not None and value < bound.min:
        failures.append(f"{name} {metric.format()} < {bound.min:g}{where}")
    if bound.max is not None and value > bound.max:
        failures.append(f"{name} {metric.format()} > {bound.max:g}{where}")
    straddles = bound.on == "point" and metric.ci is not None and any(
        limit is not None and metric.ci[0] < limit < metric.ci[1] for limit in (bound.min, bound.max)
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
