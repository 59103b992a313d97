"""The sweep analysis against the research log's printed tables and hand arithmetic."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from csv_tables import points_from_csv, read_table
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sae_acceptance.train.analysis import analysis_markdown, write_analysis
from sae_acceptance.train.tables import (
    SweepPoint,
    analysis_report,
    correlations,
    delta_table,
    kstar,
    kstar_table,
    scale_table,
)

REFERENCE = Path(__file__).parent / "data" / "reference"
PRINTED = 0.0005  # the log prints 3 decimals: a printed value is within half a unit of the truth


@pytest.fixture(scope="module")
def fast3() -> list[SweepPoint]:
    return points_from_csv(REFERENCE / "fast3_mid.csv", depth="mid")


def by_k(rows: list[dict]) -> dict[int, dict]:
    return {row["k"]: row for row in rows}


# k*(t)

KS, CE_REC = [8, 16, 32, 64], [0.3, 0.5, 0.7, 0.8]


@pytest.mark.parametrize(
    "target, expected",
    [
        (0.6, 24.0),  # 0.5 < 0.6 <= 0.7: 16 + (0.6 - 0.5) / (0.7 - 0.5) * (32 - 16) = 16 + 8
        (0.75, 48.0),  # 0.7 < 0.75 <= 0.8: 32 + (0.75 - 0.7) / (0.8 - 0.7) * (64 - 32) = 32 + 16
        (0.7, 32.0),  # lands on a grid point: 16 + (0.7 - 0.5) / 0.2 * 16 = 32
        (0.8, 64.0),  # the last grid point reaches it exactly
        (0.3, 8.0),  # the first grid point already reaches it
        (0.1, 8.0),  # ... and is the answer however low the target
        (0.81, None),  # no grid point reaches it: undefined, not extrapolated
    ],
)
def test_kstar_interpolates_linearly_in_k(target, expected):
    assert kstar(KS, CE_REC, target) == pytest.approx(expected)
    assert kstar(KS[::-1], CE_REC[::-1], target) == pytest.approx(expected)  # grid order is irrelevant


def test_kstar_takes_the_first_crossing_of_a_non_monotone_curve():
    # 0.3 < 0.65 <= 0.7 between k=8 and 16: 8 + (0.65 - 0.3) / (0.7 - 0.3) * 8 = 8 + 7 = 15,
    # although ce_rec dips below 0.65 again at k=32
    assert kstar([8, 16, 32, 64], [0.3, 0.7, 0.6, 0.9], 0.65) == pytest.approx(15.0)


def test_kstar_rejects_malformed_grids():
    with pytest.raises(ValueError, match="k values"):
        kstar([8, 16], [0.5], 0.6)
    with pytest.raises(ValueError, match="repeated k"):
        kstar([8, 8, 16], [0.5, 0.6, 0.7], 0.6)
    assert kstar([], [], 0.5) is None


@settings(derandomize=True, max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 0.3), min_size=2, max_size=7), st.floats(0.0, 1.0))
def test_kstar_on_an_increasing_curve_is_where_the_curve_meets_the_target(steps, fraction):
    ks = [2**i for i in range(3, 3 + len(steps))]
    curve = np.cumsum(steps)
    target = curve[0] + fraction * (curve[-1] - curve[0])
    k = kstar(ks, list(curve), target)
    assert ks[0] <= k <= ks[-1]
    assert np.interp(k, ks, curve) == pytest.approx(target, abs=1e-9)


def test_kstar_table_reports_each_model_and_the_ratio():
    small = [0.5, 0.7, 0.9, 0.95]
    large = [0.4, 0.6, 0.8, 0.96]
    points = [
        SweepPoint(model=m, depth="mid", k=k, d_model=d, ce_rec=c)
        for m, d, curve in (("small", 512, small), ("large", 1024, large))
        for k, c in zip(KS, curve, strict=True)
    ]
    rows = kstar_table(points, "mid", [0.85, 0.9, 0.99], ["small", "large"])
    # t=0.85: small 16 + 0.15/0.2*16 = 28; large 32 + 0.05/0.16*32 = 42; ratio 42/28 = 1.5
    # t=0.90: small 16 + 0.2/0.2*16 = 32; large 32 + 0.1/0.16*32 = 52; ratio 52/32 = 1.625
    assert rows[0]["kstar"] == pytest.approx({"small": 28.0, "large": 42.0})
    assert rows[0]["ratio"] == pytest.approx(1.5)
    assert rows[1]["kstar"] == pytest.approx({"small": 32.0, "large": 52.0})
    assert rows[1]["ratio"] == pytest.approx(1.625)
    assert rows[2]["kstar"] == {"small": None, "large": None} and rows[2]["ratio"] is None


def test_the_logs_kstar_ratios_agree_with_its_kstar_values_within_rounding():
    """fast2_kstar.csv cannot be recomputed (the full Fast2 grid is not printed), but its ratio
    column must follow from its k* columns, and the k* tax is positive in every row."""
    for row in read_table(REFERENCE / "fast2_kstar.csv"):
        small, large = row["kstar_70m"], row["kstar_410m"]  # printed to 0.1
        low, high = (large - 0.05) / (small + 0.05), (large + 0.05) / (small - 0.05)
        assert low - 0.005 <= row["ratio"] <= high + 0.005, row  # ratio printed to 0.01
        assert large > small


# Delta tables


def test_fast3_delta_table_410m_minus_70m_by_hand(fast3):
    rows = by_k(delta_table(fast3, "mid", "pythia-70m", "pythia-410m"))
    by_hand = {  # from fast3_mid.csv: (r2 410M - r2 70M, ce_rec 410M - ce_rec 70M)
        8: (0.961 - 0.810, 0.269 - 0.372),  # +0.151, -0.103
        16: (0.968 - 0.855, 0.530 - 0.580),  # +0.113, -0.050
        32: (0.974 - 0.891, 0.723 - 0.729),  # +0.083, -0.006
        64: (0.979 - 0.922, 0.814 - 0.836),  # +0.057, -0.022
    }
    assert sorted(rows) == sorted(by_hand)
    for k, (d_r2, d_ce) in by_hand.items():
        assert rows[k]["delta_r2"] == pytest.approx(d_r2, abs=1e-12)
        assert rows[k]["delta_ce_rec"] == pytest.approx(d_ce, abs=1e-12)
    assert rows[8]["delta_r2"] == pytest.approx(0.151) and rows[8]["delta_ce_rec"] == pytest.approx(-0.103)
    for k in (8, 16):  # the log: r2 up, ce_rec down with scale at low k
        assert rows[k]["delta_r2"] > 0 and rows[k]["delta_ce_rec"] < 0


def test_fast3_monotonicity_breaks_at_high_k_between_160m_and_410m(fast3):
    """The log: at k >= 32, 410M recovers more behaviour than 160M (0.723 vs 0.696, 0.814 vs 0.809)."""
    rows = by_k(delta_table(fast3, "mid", "pythia-160m", "pythia-410m"))
    assert rows[8]["delta_ce_rec"] < 0 and rows[16]["delta_ce_rec"] < 0
    assert rows[32]["delta_ce_rec"] == pytest.approx(0.027) and rows[64]["delta_ce_rec"] == pytest.approx(0.005)


def test_fast2_mid_deltas_have_the_logs_sign_pattern():
    rows = read_table(REFERENCE / "fast2_mid_deltas.csv")
    assert [r["k"] for r in rows] == [8, 16, 32, 64, 128, 256]
    assert all(r["delta_r2"] > 0 and r["delta_ce_rec"] < 0 for r in rows)


def test_printed_fast2_points_reproduce_the_printed_fast2_deltas():
    """The Fast2 points the log prints elsewhere (k=8 scale table, k=32 budget checks at 10M)
    give its delta rows: a difference of two printed values plus a printed delta is off by at
    most 3 half-units."""
    printed = by_k(read_table(REFERENCE / "fast2_mid_deltas.csv"))
    k8 = points_from_csv(REFERENCE / "fast2_mid_k8_scale.csv", depth="mid", k=8)
    budget = points_from_csv(REFERENCE / "budget_checks.csv", depth="mid")
    k32 = [p for p in budget if p.train_tokens == 10_000_000 and p.k == 32]
    computed = by_k(delta_table(k8 + k32, "mid", "pythia-70m", "pythia-410m"))
    assert sorted(computed) == [8, 32]
    # k=8: 0.961 - 0.807 = +0.154 (printed +0.154); 0.235 - 0.340 = -0.105 (printed -0.106)
    assert computed[8]["delta_r2"] == pytest.approx(printed[8]["delta_r2"], abs=3 * PRINTED)
    for k in (8, 32):  # k=32: 0.714 - 0.731 = -0.017 (printed -0.017)
        assert computed[k]["delta_ce_rec"] == pytest.approx(printed[k]["delta_ce_rec"], abs=3 * PRINTED)
    assert computed[32]["delta_r2"] is None  # the budget table prints no r2 at 10M, k=32


def test_two_budgets_at_one_k_are_refused_not_mixed():
    budget = points_from_csv(REFERENCE / "budget_checks.csv", depth="mid")
    with pytest.raises(ValueError, match="one budget at a time"):
        delta_table(budget, "mid", "pythia-70m", "pythia-410m")


# Correlations


def demeaned_by_k(ks: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = values.astype(float).copy()
    for k in set(ks.tolist()):
        out[ks == k] = values[ks == k] - np.mean(values[ks == k])
    return out


def test_fast3_correlations_match_scipy_on_hand_demeaned_arrays(fast3):
    ks = np.array([p.k for p in fast3])
    r2, ce = np.array([p.r2 for p in fast3]), np.array([p.ce_rec for p in fast3])
    result = correlations(fast3, "mid")
    assert result["n"] == 12
    assert result["corr_pooled"] == pytest.approx(stats.pearsonr(r2, ce)[0], abs=1e-12)
    within = stats.pearsonr(demeaned_by_k(ks, r2), demeaned_by_k(ks, ce))[0]
    assert result["corr_within_k"] == pytest.approx(within, abs=1e-12)
    # the log's mid-depth sign (Fast2: -0.943): at fixed k, scale moves r2 and ce_rec apart
    logged = {row["depth"]: row for row in read_table(REFERENCE / "fast2_correlations.csv")}
    assert result["corr_within_k"] < 0 and logged["mid"]["corr_within_k"] < 0


@settings(derandomize=True, max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=4, max_size=4),
    st.lists(st.floats(-5, 5), min_size=4, max_size=4),
)
def test_corr_within_k_ignores_per_k_offsets(r2_offsets, ce_offsets):
    points = points_from_csv(REFERENCE / "fast3_mid.csv", depth="mid")
    offset = dict(zip([8, 16, 32, 64], zip(r2_offsets, ce_offsets, strict=True), strict=True))
    shifted = [replace(p, r2=p.r2 + offset[p.k][0], ce_rec=p.ce_rec + offset[p.k][1]) for p in points]
    before, after = correlations(points, "mid"), correlations(shifted, "mid")
    assert after["corr_within_k"] == pytest.approx(before["corr_within_k"], abs=1e-9)


def test_undefined_correlations_raise_instead_of_nan(fast3):
    with pytest.raises(ValueError, match="at least 3"):
        correlations(fast3[:2], "mid")
    one_model = [p for p in fast3 if p.model == "pythia-70m"]  # residuals within k are all zero
    with pytest.raises(ValueError, match="zero variance"):
        correlations(one_model, "mid")
    (row,) = analysis_report(one_model)["correlations"]  # the report keeps what is defined
    r2, ce = [p.r2 for p in one_model], [p.ce_rec for p in one_model]
    assert row["corr_pooled"] == pytest.approx(stats.pearsonr(r2, ce)[0], abs=1e-12)
    assert row["corr_within_k"] is None and "zero variance" in row["undefined"]


# Scale table


@pytest.mark.parametrize("model, printed_ratio", [("pythia-70m", 1.660), ("pythia-410m", 1.765)])
def test_scale_table_matches_the_logs_printed_values_within_rounding(model, printed_ratio):
    """SSE/token = mse_mean * d_model, SST/token = SSE / (1 - r2): 70M 0.0854 * 512 = 43.7248,
    43.7248 / 0.193 = 226.6 vs printed 226.7; 410M 0.1575 * 1024 = 161.28, / 0.039 = 4135.4 vs
    printed 4131.1. r2 is printed to 3 decimals, so SST is only known to the range it spans."""
    points = points_from_csv(REFERENCE / "fast2_mid_k8_scale.csv", depth="mid", k=8)
    point = next(p for p in points if p.model == model)
    printed = next(r for r in read_table(REFERENCE / "fast2_mid_k8_scale.csv") if r["model"] == model)
    (row,) = scale_table([point])
    assert row["sse_per_token"] == pytest.approx(point.mse_mean * point.d_model)
    assert round(row["sse_per_token"], 1) == printed["sse_per_token"]
    # SST grows with mse_mean and r2: its range is spanned by the low and high corners
    low, high = (
        scale_table([replace(point, mse_mean=point.mse_mean + s * PRINTED / 10, r2=point.r2 + s * PRINTED)])[0]
        for s in (-1, 1)
    )
    assert low["sst_per_token"] <= printed["sst_per_token"] <= high["sst_per_token"]
    assert (high["sst_per_token"] - low["sst_per_token"]) / printed["sst_per_token"] < 0.03  # a tight check
    assert row["loss_ratio"] == pytest.approx(printed_ratio)  # the log's implied L_recon/L_orig


def test_410m_variance_scale_is_about_18x_the_70m_one():
    rows = scale_table(points_from_csv(REFERENCE / "fast2_mid_k8_scale.csv", depth="mid", k=8))
    sst = {r["model"]: r["sst_per_token"] for r in rows}
    assert 17.5 < sst["pythia-410m"] / sst["pythia-70m"] < 18.5


# Loading and the report


def test_loader_reads_the_reference_layout(fast3):
    assert len(fast3) == 12
    first = fast3[0]
    assert (first.model, first.d_model, first.layer, first.depth, first.k) == (
        "pythia-70m",
        512,
        3,
        "mid",
        8,
    )
    assert first.ce_rec_ci == (0.232, 0.478)
    assert next(p for p in fast3 if p.model == "pythia-160m").layer is None  # the log omits it
    with pytest.raises(ValueError, match="depth"):
        points_from_csv(REFERENCE / "fast3_mid.csv")


def test_sweep_dicts_are_accepted_and_non_finite_metrics_count_as_missing(fast3):
    records = [asdict(p) | {"ce_rec_ci": list(p.ce_rec_ci), "l0": 8.0} for p in fast3]  # as in points.json
    assert analysis_report(records) == analysis_report(fast3)
    broken = SweepPoint.from_mapping(records[0] | {"cosine": float("nan"), "ce_rec_ci": [0.1, float("inf")]})
    assert broken.cosine is None and broken.ce_rec_ci is None


def test_report_covers_every_model_pair_and_marks_undefined_kstar(fast3):
    report = analysis_report(fast3)
    assert report["models"] == ["pythia-70m", "pythia-160m", "pythia-410m"]  # by d_model
    assert analysis_report(fast3[::-1]) == report  # whatever order the sweep finished in
    pairs = [(d["smaller"], d["larger"]) for d in report["deltas"]]
    assert pairs == [
        ("pythia-70m", "pythia-160m"),
        ("pythia-70m", "pythia-410m"),
        ("pythia-160m", "pythia-410m"),
    ]
    assert [r["target"] for r in report["kstar"]] == [0.85, 0.90]
    assert all(v is None for r in report["kstar"] for v in r["kstar"].values())  # Fast3 tops out at 0.836
    markdown = analysis_markdown(report)
    assert "| 8 | +0.151 | -0.103 |" in markdown
    assert "| mid | 0.85 | undefined | undefined | undefined | — |" in markdown


def test_write_analysis_writes_json_markdown_and_two_pngs(fast3, tmp_path):
    paths = write_analysis(fast3, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "analysis.json",
        "analysis.md",
        "ce_rec_vs_k.png",
        "r2_vs_ce_rec.png",
    ]  # and no temporary file left behind

    def no_nan(constant):
        raise AssertionError(f"{constant} in analysis.json")

    report = json.loads(paths["json"].read_text(), parse_constant=no_nan)
    assert report == json.loads(json.dumps(analysis_report(fast3)))
    assert paths["markdown"].read_text().startswith("# Sweep analysis")
    for name in ("ce_rec_vs_k", "r2_vs_ce_rec"):
        data = paths[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
