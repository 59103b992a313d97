"""Bounds -> verdicts: which number a bound checks, what the message says, and NaN always failing."""

from __future__ import annotations

import math

import pytest

from sae_acceptance.config import Bound
from sae_acceptance.results import SAEResult
from sae_acceptance.verdict import MetricValue, Status, judge

CE_REC = MetricValue(0.612, (0.550, 0.671))


@pytest.mark.parametrize(
    ("on", "checked", "passed"), [("point", 0.612, True), ("ci_low", 0.550, False), ("ci_high", 0.671, True)]
)
def test_a_bound_checks_the_point_or_one_end_of_the_interval(on, checked, passed):
    verdict = judge("ce_rec", CE_REC, Bound(min=0.6, on=on))
    assert verdict.checked == checked and verdict.passed is passed and verdict.finite


def test_failure_message_and_straddling():
    failed = judge("ce_rec", CE_REC, Bound(min=0.8, on="ci_low"), context="loss 3.21 -> 4.45 nats (+38.6%)")
    assert failed.message == "ce_rec 0.612 [0.550, 0.671] < 0.8 (on ci_low); loss 3.21 -> 4.45 nats (+38.6%)"
    straddling = judge("ce_rec", CE_REC, Bound(min=0.6))
    assert straddling.passed and straddling.straddles and "straddles the bound" in straddling.message
    assert not judge("rel_error", MetricValue(0.5, (0.45, 0.55)), Bound(max=0.45, on="ci_low")).straddles


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_metric_fails_even_where_a_failure_is_expected(value):
    verdict = judge("kl_div_score", MetricValue(value, (value, value)), Bound(min=0.9))
    assert not verdict.passed and not verdict.finite and "not finite" in verdict.message
    result = SAEResult(name="control", path="p", verdicts={"kl_div_score": verdict}, expect_fail=["kl_div_score"])
    assert not result.as_expected("kl_div_score") and not result.passed  # NaN is no control caught
    caught = judge("kl_div_score", MetricValue(0.2, (0.1, 0.3)), Bound(min=0.9))
    control = SAEResult(name="control", path="p", verdicts={"kl_div_score": caught}, expect_fail=["kl_div_score"])
    assert control.as_expected("kl_div_score") and control.passed


def test_a_missing_interval_fails_an_interval_bound():
    verdict = judge("ce_rec", MetricValue(0.9, None), Bound(min=0.8, on="ci_low"))
    assert not verdict.passed and "its interval is not finite" in verdict.message


VERDICT_CASES = {
    # case: (metric value, bound, on a negative control?, status, as expected, words in the message)
    "pass": (MetricValue(0.9, (0.85, 0.95)), Bound(min=0.8, on="ci_low"), False, Status.PASSED, True, ">= 0.8"),
    "fail": (MetricValue(0.7, (0.65, 0.75)), Bound(min=0.8), False, Status.FAILED, False, "< 0.8 (on point)"),
    "caught control": (
        MetricValue(0.7, (0.65, 0.75)),
        Bound(min=0.8),
        True,
        Status.CAUGHT,
        True,
        "negative control caught",
    ),
    "missed control": (
        MetricValue(0.9, (0.85, 0.95)),
        Bound(min=0.8),
        True,
        Status.MISSED,
        False,
        "gate no longer catches it",
    ),
    "nan": (MetricValue(math.nan, None), Bound(min=0.8), False, Status.BROKEN, False, "not finite"),
    "nan on a control": (MetricValue(math.nan, None), Bound(min=0.8), True, Status.BROKEN, False, "not finite"),
    "straddling interval": (
        MetricValue(0.81, (0.7, 0.9)),
        Bound(min=0.8),
        False,
        Status.PASSED,
        True,
        "straddles the bound",
    ),
}


@pytest.mark.parametrize("case", list(VERDICT_CASES))
def test_the_outcome_of_every_kind_of_item(case):
    metric, bound, control, status, expected, words = VERDICT_CASES[case]
    result = SAEResult(
        name="s",
        path="p",
        verdicts={"ce_rec": judge("ce_rec", metric, bound)},
        expect_fail=["ce_rec"] if control else [],
    )
    decided = result.outcome("ce_rec")
    assert decided.status is status and decided.as_expected is expected and words in decided.message
    assert result.passed is expected
    assert result.status.word == ("FAIL" if not expected else "CAUGHT (control)" if control else "PASS")


def test_an_sae_without_bounds_is_measured_not_judged():
    assert SAEResult(name="s", path="p").status.word == "no bounds"
    assert SAEResult(name="s", path="p", error="bad").status.word == "ERROR"
