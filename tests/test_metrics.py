"""Metric and bootstrap invariants (hypothesis), and numerics under a large activation mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sae_acceptance.metrics import SUM_NAMES, alive_fraction, rate_bits
from sae_acceptance.stats import (
    BootstrapSettings,
    SequenceSums,
    bootstrap_intervals,
    resample_counts,
)

N_SEQ, T, D = 6, 5, 4
# fixed examples and no per-example deadline: the same cases on every run, on a busy CI machine too
SETTINGS = settings(deadline=None, derandomize=True)


def sums_from_activations(a: np.ndarray, r: np.ndarray, ce_orig=None, ce_recon=None) -> SequenceSums:
    """Independent float64 construction of the per-sequence sums from [n_seq, T, D] arrays."""
    shift = a[0].mean(0)
    na, nr = np.linalg.norm(a, axis=-1), np.linalg.norm(r, axis=-1)
    err = ((a - r) ** 2).sum(-1)
    ones = np.ones(a.shape[:2])
    scalars = {
        "n_tokens": ones.sum(1),
        "n_loss": ones.sum(1) - 1,
        "ce_orig": ones.sum(1) if ce_orig is None else ce_orig,
        "ce_recon": ones.sum(1) if ce_recon is None else ce_recon,
        "ce_ablate": 3 * ones.sum(1),
        "kl_recon": np.zeros(a.shape[0]),
        "kl_ablate": ones.sum(1),
        "cos": np.where(nr > 0, (a * r).sum(-1) / np.maximum(na * nr, 1e-300), 0).clip(-1, 1).sum(1),
        "rel_err": (np.sqrt(err) / na).sum(1),
        "sq_err": err.sum(1),
        "act_sq": ((a - shift) ** 2).sum((1, 2)),
        "l2_ratio": (nr / na).sum(1),
        "l0": ones.sum(1),
    }
    assert set(scalars) == set(SUM_NAMES)
    return SequenceSums(scalars, np.ones(3, dtype=np.int64), a.shape[-1], (a - shift).sum(1))


finite = st.floats(-10, 10, allow_nan=False, width=64)
activations = arrays(np.float64, (N_SEQ, T, D), elements=finite).filter(
    lambda a: np.linalg.norm(a, axis=-1).min() > 1e-3 and a.reshape(-1, D).std(0).sum() > 1e-2
)


@SETTINGS
@given(activations)
def test_perfect_reconstruction(a):
    m = sums_from_activations(a, a.copy()).metrics()
    assert m["r2"] == pytest.approx(1.0) and m["cosine"] == pytest.approx(1.0) and m["rel_error"] == 0.0


@SETTINGS
@given(activations, activations, st.floats(0.01, 100))
def test_scaling_both_leaves_r2_cosine_rel_error_unchanged(a, r, c):
    m1, m2 = sums_from_activations(a, r).metrics(), sums_from_activations(c * a, c * r).metrics()
    for name in ("r2", "cosine", "rel_error"):
        assert m2[name] == pytest.approx(m1[name], rel=1e-6, abs=1e-9), name


@SETTINGS
@given(activations, activations, arrays(np.float64, (D,), elements=st.floats(-1e3, 1e3)))
def test_translating_both_leaves_r2_unchanged(a, r, t):
    m1, m2 = sums_from_activations(a, r).metrics(), sums_from_activations(a + t, r + t).metrics()
    assert m2["r2"] == pytest.approx(m1["r2"], rel=1e-6, abs=1e-6)


@SETTINGS
@given(activations, activations)
def test_cosine_in_range(a, r):
    assert -1.0 <= sums_from_activations(a, r).metrics()["cosine"] <= 1.0


@SETTINGS
@given(arrays(np.float64, (N_SEQ,), elements=st.floats(0.1, 50)))
def test_ce_rec_is_one_exactly_when_losses_match(ce):
    a = np.random.default_rng(0).normal(size=(N_SEQ, T, D))
    assert sums_from_activations(a, a, ce, ce.copy()).metrics()["ce_rec"] == 1.0
    assert sums_from_activations(a, a, ce, ce * 1.1).metrics()["ce_rec"] < 1.0


@settings(max_examples=30, deadline=None, derandomize=True)
@given(arrays(np.float64, (40,), elements=st.floats(0.5, 20)), arrays(np.float64, (40,), elements=st.floats(0.5, 20)))
def test_interval_contains_the_point_for_a_ratio_of_positive_sums(orig, recon):
    a = np.random.default_rng(1).normal(size=(40, 2, 3))
    sums = sums_from_activations(a, a, orig, recon)
    point = sums.metrics()["ce_rec"]
    lo, hi = bootstrap_intervals(sums, BootstrapSettings(500, 0.95, 0))["ce_rec"]
    rounding = 1e-12 * max(1.0, abs(point))  # the point and the resamples sum in different orders
    assert lo - rounding <= point <= hi + rounding


def test_seeds_and_resample_counts():
    rng = np.random.default_rng(2)
    a, r = rng.normal(size=(200, 3, 4)), rng.normal(size=(200, 3, 4))
    sums = sums_from_activations(a, r, rng.uniform(1, 3, 200), rng.uniform(1, 4, 200))
    first = bootstrap_intervals(sums, BootstrapSettings(1000, 0.95, 7))
    assert first == bootstrap_intervals(sums, BootstrapSettings(1000, 0.95, 7))
    assert first != bootstrap_intervals(sums, BootstrapSettings(1000, 0.95, 8))
    big = [bootstrap_intervals(sums, BootstrapSettings(20_000, 0.95, s))["ce_rec"] for s in (0, 1)]
    assert big[0] == pytest.approx(big[1], abs=0.01)  # more resamples: seeds stop mattering
    counts = resample_counts(200, BootstrapSettings(50, 0.95, 0))
    assert counts.shape == (50, 200) and (counts.sum(1) == 200).all()


def test_alive_fraction_and_rate_bits():
    fired = np.array([0, 4, 4, 0])
    assert alive_fraction(fired) == 0.5
    # two latents, each half the active slots: 1 bit per active index, 8 bits per value, l0 = 1
    assert rate_bits(fired, n_tokens=8) == pytest.approx((8 * 1 + 8 * 8) / 8)


def test_r2_is_exact_under_a_large_activation_mean():
    """The reference model's canyon layer has SST/token in the tens of thousands: the engine's
    shifted sums must still give the two-pass float64 R²."""
    from sae_acceptance.engine import run_hook
    from sae_acceptance.sources.model import load_model
    from sae_acceptance.sources.sae_io import load_sae

    model = load_model(REPO / "reference" / "model", device="cpu")
    tokens = torch.from_numpy(np.load(REPO / "reference" / "tokens.npy")[:32].astype(np.int64))
    counted = torch.ones_like(tokens, dtype=torch.bool)
    hook = "blocks.2.hook_resid_post"
    sae = load_sae(REPO / "reference" / "saes" / "L2-k4")
    m = run_hook(model, hook, {"s": sae}, tokens, counted, 16, False).sums["s"].metrics()
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    a = cache[hook].reshape(-1, 64).double()
    r = sae.reconstruct(a.float())[0].double()
    sst = ((a - a.mean(0)) ** 2).sum()
    assert float(sst / a.shape[0]) > 1e4
    assert m["r2"] == pytest.approx(float(1 - ((a - r) ** 2).sum() / sst), rel=1e-7)
    assert m["sst_per_token"] == pytest.approx(float(sst / a.shape[0]), rel=1e-7)


def test_bootstrap_bytes_bounds_what_the_resample_matrix_allocates():
    """The up-front memory check counts at least what `resample_counts` holds at its peak."""
    import tracemalloc

    from sae_acceptance.stats import bootstrap_bytes

    tracemalloc.start()
    try:
        resample_counts(50, BootstrapSettings(20_000, 0.95, 0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.5 * bootstrap_bytes(50, 20_000) < peak <= bootstrap_bytes(50, 20_000)
