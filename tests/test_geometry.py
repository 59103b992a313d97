"""Participation ratio, streaming covariance and the PR-canyon rule."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.stats import ortho_group

from sae_acceptance.config import CanyonSettings
from sae_acceptance.covariance import CovarianceAccumulator
from sae_acceptance.errors import SourceError
from sae_acceptance.geometry import LayerGeometry, participation_ratio, pr_from_covariance
from sae_acceptance.pr_profile import (
    format_profile_table,
    plot_pr_profile,
    pr_profile,
    profile_to_json,
)

DATA = Path(__file__).parent / "data" / "reference"


def rotated(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    """Q diag(λ) Qᵀ with a fixed random orthogonal Q."""
    q = ortho_group.rvs(len(lam), random_state=seed)
    return q @ np.diag(lam) @ q.T


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- PR of known spectra ---------------------------------------------------------


@pytest.mark.parametrize("d", [2, 17, 64])
def test_pr_isotropic_is_d_and_rank_one_is_one(d):
    assert pr_from_covariance(rotated(np.ones(d)))[0] == pytest.approx(d, rel=1e-10)
    lam = np.zeros(d)
    lam[0] = 3.7
    assert pr_from_covariance(rotated(lam, seed=1))[0] == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize(("d", "m", "a", "b"), [(32, 1, 100.0, 1.0), (50, 7, 5.0, 0.3), (10, 9, 1.0, 1e-3)])
def test_pr_two_level_spectrum_closed_form(d, m, a, b):
    lam = np.r_[np.full(m, a), np.full(d - m, b)]
    expected = (m * a + (d - m) * b) ** 2 / (m * a**2 + (d - m) * b**2)
    assert pr_from_covariance(rotated(lam, seed=d))[0] == pytest.approx(expected, rel=1e-9)


def test_deflation_removes_exactly_the_top_eigenvalue():
    rng = np.random.default_rng(0)
    lam = np.sort(rng.exponential(size=40))[::-1]
    lam[0] = 200.0  # one dominant direction, as in a canyon layer
    pr, pr_deflated = pr_from_covariance(rotated(lam, seed=3))
    assert pr == pytest.approx(participation_ratio(lam), rel=1e-9)
    assert pr_deflated == pytest.approx(participation_ratio(lam[1:]), rel=1e-9)
    assert pr < 2 < 10 < pr_deflated


def test_pr_clips_round_off_and_rejects_bad_input():
    lam = np.r_[1.0, 1.0, np.zeros(8)]
    cov = rotated(lam, seed=2)  # zero eigenvalues come back as ±1e-17
    assert pr_from_covariance(cov)[0] == pytest.approx(2.0, rel=1e-12)
    assert math.isnan(pr_from_covariance(np.zeros((4, 4)))[0])
    with pytest.raises(ValueError, match="NaN"):
        pr_from_covariance(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="square"):
        pr_from_covariance(np.ones((3, 2)))


def test_pr_from_samples_is_close_to_the_true_pr():
    d, n = 24, 40_000
    lam = 0.8 ** np.arange(d)
    cov = rotated(lam, seed=5)
    x = np.random.default_rng(5).multivariate_normal(np.full(d, 3.0), cov, size=n)
    acc = CovarianceAccumulator(d)
    for chunk in np.array_split(x, 7):
        acc.update(torch.from_numpy(chunk))
    pr, pr_deflated = pr_from_covariance(acc.covariance())
    assert pr == pytest.approx(participation_ratio(lam), rel=0.03)
    assert pr_deflated == pytest.approx(participation_ratio(lam[1:]), rel=0.03)


# --- streaming covariance ----------------------------------------------------------


def _streamed(x: np.ndarray, cuts: list[int]) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(x.shape[1])
    for part in np.split(x, sorted(cuts)):
        acc.update(torch.from_numpy(part))
    return acc


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 120),
    d=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 120), max_size=6),
    offset=st.sampled_from([0.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_one_shot(n, d, cuts, offset, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)) * np.linspace(0.1, 3, d) + offset
    acc = _streamed(x, [min(c, n) for c in cuts])
    assert acc.count == n
    expected = np.cov(x, rowvar=False, bias=True).reshape(d, d)
    assert rel_err(acc.covariance(), expected) < 1e-8


def test_large_mean_is_handled_where_the_naive_formula_fails():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 8)) + np.linspace(1e6, 2e6, 8)
    expected = np.cov(x, rowvar=False, bias=True)
    acc = CovarianceAccumulator(8)
    for part in np.array_split(x, 13):
        acc.update(torch.from_numpy(part))
    assert rel_err(acc.covariance(), expected) < 1e-8
    naive = x.T @ x / len(x) - np.outer(x.mean(0), x.mean(0))
    assert rel_err(naive, expected) > 1e-6  # the offset really is hard


def test_mask_excludes_rows_and_weights_repeat_them():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 5)) + 10.0
    x[rng.random(60) < 0.3] = 1e3  # junk rows the mask must drop
    keep = np.abs(x[:, 0]) < 100
    acc = CovarianceAccumulator(5)
    for part, m in zip(np.array_split(x, 4), np.array_split(keep, 4), strict=True):
        acc.update(torch.from_numpy(part), mask=torch.from_numpy(m))
    assert acc.count == keep.sum()
    assert rel_err(acc.covariance(), np.cov(x[keep], rowvar=False, bias=True)) < 1e-10

    w = rng.integers(0, 4, size=60)
    acc = CovarianceAccumulator(5)
    for part, wp in zip(np.split(x, [7, 30, 31]), np.split(w.astype(np.float64), [7, 30, 31]), strict=True):
        acc.update(torch.from_numpy(part), weights=torch.from_numpy(wp))
    repeated = np.repeat(x, w, axis=0)
    assert rel_err(acc.covariance(), np.cov(repeated, rowvar=False, bias=True)) < 1e-10


def test_shards_with_different_means_and_empty_raises():
    """Later rows far from the first batch's mean (the shift) still give the exact covariance."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 6)) * 2 + 500.0
    x[40:] += 1e4  # the rows after the first batch sit far from its mean
    acc = CovarianceAccumulator(6)
    for part in (x[:40], x[40:]):
        acc.update(torch.from_numpy(part))
    assert acc.count == 300
    assert rel_err(acc.covariance(), np.cov(x, rowvar=False, bias=True)) < 1e-10
    empty = CovarianceAccumulator(6)
    empty.update(torch.from_numpy(x[:5]), mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="excluded"):
        empty.covariance()


# --- canyon rule --------------------------------------------------------------------


def test_canyon_rule_on_the_published_points():
    rows = list(csv.DictReader((DATA / "pr_raw.csv").open()))
    rule = CanyonSettings()
    flagged = set()
    for row in rows:
        ratio = float(row["pr"]) / int(row["d_model"])
        assert ratio == pytest.approx(float(row["pr_ratio"]), abs=5e-4)
        if rule.flags(ratio, math.nan):
            flagged.add((row["model"], int(row["layer"])))
    assert flagged == {("pythia-70m", 3), ("pythia-410m", 5), ("pythia-410m", 12)}
    assert len(rows) == 5  # 70M L1 and 410M L4 were read and not flagged


def test_canyon_rule_uses_the_chosen_ratio():
    raw, deflated = CanyonSettings(threshold=0.02, use="raw"), CanyonSettings(threshold=0.02, use="deflated")
    assert raw.flags(0.01, 0.5) and not raw.flags(0.5, 0.01)
    assert deflated.flags(0.5, 0.01) and not deflated.flags(0.01, 0.5)
    assert not CanyonSettings().flags(math.nan, math.nan)
    with pytest.raises(ValidationError, match="raw"):
        CanyonSettings(use="top")
    with pytest.raises(ValidationError, match="threshold"):
        CanyonSettings(threshold=1.5)


# --- profile on a tiny HookedTransformer -------------------------------------------


@pytest.fixture(scope="module")
def tiny_ht():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_vocab=50,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.x: HookedTransformer is deprecated
        return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (21, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference_acts(tiny_ht, tokens):
    """Activations from one plain full-batch run_with_cache, float64 numpy."""
    with torch.no_grad():
        _, cache = tiny_ht.run_with_cache(tokens)
    return {name: t.double().numpy() for name, t in cache.items()}


def _independent_pr(acts, counted, hook_type="resid_post"):
    out = []
    for layer in range(3):
        a = acts[f"blocks.{layer}.hook_{hook_type}"][counted.numpy()]
        lam = np.sort(np.linalg.eigvalsh(np.cov(a, rowvar=False, bias=True)))[::-1]
        out.append((lam.sum() ** 2 / (lam**2).sum(), lam[1:].sum() ** 2 / (lam[1:] ** 2).sum()))
    return out


@pytest.mark.parametrize("hook_type", ["resid_post", "mlp_out"])
def test_pr_profile_matches_an_independent_computation(tiny_ht, tokens, reference_acts, hook_type):
    counted = torch.ones_like(tokens, dtype=torch.bool)
    profile = pr_profile(tiny_ht, tokens, hook_type=hook_type, batch_size=8, progress=False)
    assert [g.layer for g in profile] == [0, 1, 2]
    assert [g.hook for g in profile] == [f"blocks.{i}.hook_{hook_type}" for i in range(3)]
    expected = _independent_pr(reference_acts, counted, hook_type)
    for g, (pr, pr_deflated) in zip(profile, expected, strict=True):
        assert g.d_model == 32
        assert g.pr == pytest.approx(pr, rel=1e-5)
        assert g.pr_deflated == pytest.approx(pr_deflated, rel=1e-5)
        assert g.pr_ratio == pytest.approx(pr / 32, rel=1e-5)


def test_pr_profile_honours_the_counted_mask(tiny_ht, tokens, reference_acts):
    counted = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    counted[:, 0] = False  # e.g. a BOS column
    counted[4:8] = False  # a whole batch excluded
    masked = pr_profile(tiny_ht, tokens, counted, batch_size=4, progress=False)
    expected = _independent_pr(reference_acts, counted)
    unmasked = _independent_pr(reference_acts, torch.ones_like(counted))
    for g, (pr, _), (pr_all, _) in zip(masked, expected, unmasked, strict=True):
        assert g.pr == pytest.approx(pr, rel=1e-5)
        assert abs(pr - pr_all) > 1e-3 * pr_all  # the mask really changes the answer


def test_pr_profile_layer_subset_and_errors(tiny_ht, tokens):
    profile = pr_profile(
        tiny_ht, tokens, layers=[1], batch_size=8, canyon=CanyonSettings(threshold=0.9), progress=False
    )
    assert [g.layer for g in profile] == [1] and profile[0].canyon and profile[0].rule.threshold == 0.9
    with pytest.raises(SourceError, match="resid_post"):
        pr_profile(tiny_ht, tokens, batch_size=8, hook_type="resid_pots", progress=False)
    with pytest.raises(SourceError, match="layers"):
        pr_profile(tiny_ht, tokens, batch_size=8, layers=[3], progress=False)
    with pytest.raises(SourceError, match="excluded"):
        pr_profile(tiny_ht, tokens, torch.zeros_like(tokens, dtype=torch.bool), batch_size=8, progress=False)


# --- outputs ----------------------------------------------------------------------


def _profile() -> list[LayerGeometry]:
    rule = CanyonSettings()
    spectra = [np.linspace(1, 2, 64), np.r_[400.0, np.ones(63)], np.r_[4000.0, np.ones(63)]]
    return [LayerGeometry.measure(f"blocks.{i}.hook_resid_post", i, rotated(s, i), rule) for i, s in enumerate(spectra)]


def test_profile_to_json_schema():
    out = profile_to_json("tiny", _profile())
    assert set(out) == {"model", "hook_type", "rule", "layers"}
    assert out["model"] == "tiny" and out["hook_type"] == "resid_post"
    assert out["rule"] == {"threshold": 0.02, "use": "raw"}
    assert [set(row) for row in out["layers"]] == [{"layer", "hook", "pr", "pr_deflated", "pr_ratio", "canyon"}] * 3
    assert [row["canyon"] for row in out["layers"]] == [False, False, True]
    json.dumps(out, allow_nan=False)
    assert (
        profile_to_json("t", _profile(), CanyonSettings(threshold=0.5, use="deflated"), "x")["rule"]["use"]
        == "deflated"
    )


def test_table_and_plot(tmp_path):
    table = format_profile_table(_profile())
    lines = table.splitlines()
    assert len(lines) == 5 and "pr_deflated" in lines[0] and lines[-1].rstrip().endswith("yes")
    assert lines[2].split() == [
        "0",
        f"{_profile()[0].pr:.3f}",
        f"{_profile()[0].pr_deflated:.3f}",
        f"{_profile()[0].pr_ratio:.4f}",
        "no",
    ]
    path = plot_pr_profile(_profile(), tmp_path / "sub" / "pr.png", CanyonSettings(), title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
