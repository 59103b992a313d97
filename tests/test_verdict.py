"""Bounds -> verdicts: which number a bound checks, what the message says, and NaN always failing."""

from __future__ import annotations

import math

import pytest

from sae_acceptance.config import Bound
from sae_acceptance.evaluate import SAEResult
from sae_acceptance.verdict import MetricValue, judge

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
