"""Decisions, and the one table of words they are shown with.

Every pass/fail the plugin, the CLI and the reports show comes from here: `judge`
(one bound, one number), `outcome` (that verdict read against the entry's
negative controls), `regression_check` (a metric against its baseline) and
`entry_status` (a whole entry). Each outcome is a `Status` or an `EntryStatus`,
which carry their word, their CSS class and, for checks, their pytest outcome:
no view spells an outcome itself. A NaN or infinite metric fails, even where a
failure was expected. A bound checked on the point estimate whose interval
straddles it passes or fails by the point, and says that it straddles.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sae_acceptance.config import Bound
from sae_acceptance.io import finite_or_none
from sae_acceptance.metrics import METRICS


@dataclass(frozen=True)
class MetricValue:
    """A metric's point estimate and, where it has one, its bootstrap interval."""

    value: float
    ci: tuple[float, float] | None = None

    def format(self) -> str:
        """`0.815 [0.801, 0.829]`, or the value alone where there is no interval."""
        if self.ci is None:
            return f"{self.value:.4g}"
        return f"{self.value:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON form: a non-finite number is null."""
        ci = None if self.ci is None else [finite_or_none(c) for c in self.ci]
        return {"value": finite_or_none(self.value), "ci": ci}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricValue:
        """Back from `to_dict` (null is NaN again)."""
        ci = data.get("ci")
        return cls(_number(data.get("value")), None if ci is None else (_number(ci[0]), _number(ci[1])))


@dataclass(frozen=True)
class Verdict:
    """One bound applied to one metric: what was checked, against what, and the message."""

    metric: str
    passed: bool
    message: str
    bound: dict[str, Any]
    checked: float
    straddles: bool = False

    @property
    def finite(self) -> bool:
        """False when the checked number is NaN or infinite: a failed eval, whatever was expected."""
        return math.isfinite(self.checked)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: a non-finite checked number is null."""
        out = asdict(self)
        out["checked"] = finite_or_none(self.checked)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """Back from `to_dict`."""
        return cls(
            str(data["metric"]),
            bool(data["passed"]),
            str(data["message"]),
            dict(data.get("bound") or {}),
            _number(data.get("checked")),
            bool(data.get("straddles", False)),
        )


class Status(enum.Enum):
    """What one check came to: a gated metric or a regression check. Each member is
    (word, CSS class, pytest outcome), the one place these are spelt."""

    PASSED = ("passed", "passed", "passed")
    FAILED = ("FAILED", "failed", "failed")
    CAUGHT = ("caught (control)", "caught", "xfailed")  # a negative control failed, as it must
    MISSED = ("MISSED (control passed)", "missed", "failed")  # the gate no longer catches a control
    BROKEN = ("BROKEN (not finite)", "broken", "failed")  # the checked number is NaN or infinite
    OK = ("ok", "passed", "passed")  # within its tolerance of the baseline
    REGRESSED = ("REGRESSED", "failed", "failed")
    NEW = ("new", "", "skipped")  # no baseline entry: nothing to compare with
    MISSING = ("MISSING (no baseline value)", "failed", "failed")  # strict, or a value the baseline lacks

    def __init__(self, word: str, css: str, pytest_outcome: str) -> None:
        self.word, self.css, self.pytest_outcome = word, css, pytest_outcome

    @property
    def as_expected(self) -> bool:
        """What a gate's exit status reads: passed, a caught control, within tolerance, or new."""
        return self in (Status.PASSED, Status.CAUGHT, Status.OK, Status.NEW)


class EntryStatus(enum.Enum):
    """A whole entry's verdict in tables and headings: (word, CSS class)."""

    ERROR = ("ERROR", "error")
    FAIL = ("FAIL", "failed")
    REGRESSED = ("REGRESSED", "failed")
    CONTROL = ("CAUGHT (control)", "caught")
    PASS = ("PASS", "passed")
    UNBOUNDED = ("no bounds", "")  # measured only: nothing was checked

    def __init__(self, word: str, css: str) -> None:
        self.word, self.css = word, css


@dataclass(frozen=True)
class Outcome:
    """A gated item's status and the message that explains it."""

    status: Status
    message: str

    @property
    def as_expected(self) -> bool:
        """Whether the check came out as the entry expects."""
        return self.status.as_expected


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
        message = f"{name} is {value} ({what} is not finite): a failed eval, not a number"
        return Verdict(name, False, message, bound_dict, value)
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


def loss_context(metrics: Mapping[str, MetricValue]) -> str:
    """'loss 3.21 -> 4.45 nats (+38.6%)': what a behavioural failure means in the model's units."""
    orig, recon = metrics.get("ce_orig"), metrics.get("ce_recon")
    if orig is None or recon is None or not orig.value:
        return ""
    change = 100.0 * (recon.value - orig.value) / orig.value
    return f"loss {orig.value:.2f} -> {recon.value:.2f} nats ({change:+.1f}%)"


def outcome(verdict: Verdict, control: bool) -> Outcome:
    """A verdict read against the entry: `control` when the metric is in its `expect_fail`."""
    if not verdict.finite:
        return Outcome(Status.BROKEN, verdict.message)
    if control:
        if verdict.passed:
            return Outcome(Status.MISSED, f"negative control passed, the gate no longer catches it: {verdict.message}")
        return Outcome(Status.CAUGHT, f"negative control caught: {verdict.message}")
    return Outcome(Status.PASSED if verdict.passed else Status.FAILED, verdict.message)


@dataclass(frozen=True)
class RegressionCheck:
    """One metric against its baseline: the status, the paired change and its interval."""

    metric: str
    status: Status
    message: str
    change: float = math.nan
    ci: tuple[float, float] | None = None

    @property
    def passed(self) -> bool:
        """Whether the metric is within its tolerance of the baseline (or has no baseline)."""
        return self.status.as_expected

    @property
    def skipped(self) -> bool:
        """Nothing to compare with (a new SAE): pytest shows the item as skipped."""
        return self.status is Status.NEW

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the status by its name, a non-finite change as null."""
        ci = None if self.ci is None else [finite_or_none(c) for c in self.ci]
        return {
            "metric": self.metric,
            "status": self.status.name,
            "message": self.message,
            "change": finite_or_none(self.change),
            "ci": ci,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegressionCheck:
        """Back from `to_dict`."""
        ci = data.get("ci")
        return cls(
            str(data["metric"]),
            Status[str(data["status"])],
            str(data["message"]),
            _number(data.get("change")),
            None if ci is None else (_number(ci[0]), _number(ci[1])),
        )


def regression_check(
    metric: str,
    before: float,
    after: float,
    change_ci: tuple[float, tuple[float, float]] | None,
    confidence: float,
    tolerance: float,
) -> RegressionCheck:
    """One metric against its baseline value. With a paired `change_ci` ((change, interval) from a
    paired bootstrap) it regresses only when the change is worse than `tolerance` and so is the
    whole interval; a metric without an interval is judged on its change alone."""
    spec = METRICS[metric]
    sign = 1.0 if spec.higher_is_better else -1.0
    if change_ci is not None:
        change, ci = change_ci
        worse_low = min(-sign * ci[0], -sign * ci[1])
        interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}] (paired {int(100 * confidence)}% CI)"
    else:
        change, ci = after - before, None
        worse_low = -sign * change
        interval = ""
    if not math.isfinite(change) or (ci is not None and not all(map(math.isfinite, ci))):
        return RegressionCheck(metric, Status.BROKEN, f"{metric}: the change is not finite", change, ci)
    worse = -sign * change
    regressed = worse > tolerance and worse_low > tolerance
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    message = (
        f"{metric} {before:.4f} -> {after:.4f}: change {change:+.4f}{interval}, tolerance {tolerance:g} ({direction})"
    )
    if regressed:
        return RegressionCheck(metric, Status.REGRESSED, f"regression: {message}", change, ci)
    return RegressionCheck(metric, Status.OK, message, change, ci)


def entry_status(
    error: str | None, outcomes: Iterable[Outcome], regressions: Iterable[RegressionCheck], control: bool
) -> EntryStatus:
    """A whole entry's verdict: an error first, then a failed gate, then a regression."""
    if error is not None:
        return EntryStatus.ERROR
    decided = list(outcomes)
    if not all(o.as_expected for o in decided):
        return EntryStatus.FAIL
    if not all(c.passed for c in regressions):
        return EntryStatus.REGRESSED
    if not decided:
        return EntryStatus.UNBOUNDED
    return EntryStatus.CONTROL if control else EntryStatus.PASS


def canyon_warning(
    sae: str,
    r2: float,
    hook: str,
    pr: float,
    pr_ratio: float,
    threshold: float,
    metrics: Mapping[str, MetricValue] | None = None,
) -> str:
    """The R² warning where the PR canyon flags the SAE's layer (callers check the flag), citing
    the diagnostics' evidence where they ran: how much more the SAE's error costs than a random
    error of its size, and how far it leans into the loss gradient."""
    evidence = []
    measured = metrics or {}
    ratio, alignment = measured.get("error_kl_ratio"), measured.get("grad_alignment")
    if ratio is not None and math.isfinite(ratio.value):
        evidence.append(
            f"error_kl_ratio = {ratio.value:.2f} (its error costs {ratio.value:.2f}x the KL of a random one)"
        )
    if alignment is not None and math.isfinite(alignment.value):
        evidence.append(f"grad_alignment = {alignment.value:.2f} (1 for an error blind to the loss gradient)")
    cited = f"; evidence: {'; '.join(evidence)}" if evidence else ""
    return (
        f"{sae}: r2 = {r2:.3f} at {hook}, a layer the PR canyon flags "
        f"(pr = {pr:.3g}, pr_ratio = {pr_ratio:.4f} < {threshold}): "
        f"R² is variance-normalised and likely inflated here; judge by ce_rec, cosine and rel_error{cited}"
    )


def _number(x: Any) -> float:
    """JSON null back to NaN."""
    return math.nan if x is None else float(x)
