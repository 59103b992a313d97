"""dense_frac and dead_frac against a hand count on a crafted SAE, and the densities written beside the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import D_MODEL

from sae_acceptance.config import thresholds_from_mapping
from sae_acceptance.evaluate import evaluate
from sae_acceptance.metrics import dead_fraction, dense_fraction, latent_densities
from sae_acceptance.report import densities_path, write_densities
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import save_sae
from sae_acceptance.sources.tokens import counted_mask

HOOK = "blocks.1.hook_resid_post"


def crafted_sae() -> SAE:
    """Six latents: 0-1 fire on every token (bias 1, no weights), 2-4 never (bias -1),
    5 exactly where the activation's first coordinate is positive."""
    w_enc = torch.zeros(D_MODEL, 6)
    w_enc[0, 5] = 1.0
    b_enc = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 0.0])
    return SAE(
        w_enc,
        b_enc,
        torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(0)),
        torch.zeros(D_MODEL),
        architecture="standard",
        apply_b_dec_to_input=False,
        hook_name=HOOK,
    )


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_dense_and_dead_fractions_match_a_hand_count(
    tmp_path, tiny_checkpoint, tiny_tokens_file, tiny_model, threshold
):
    save_sae(crafted_sae(), tmp_path / "crafted")
    loaded = thresholds_from_mapping(
        {
            "eval": {
                "data": str(tiny_tokens_file),
                "model": str(tiny_checkpoint),
                "n_sequences": 16,
                "context_size": 16,
                "batch_size": 4,
                "bootstrap_resamples": 100,
                "dense_threshold": threshold,
            },
            "gate": {"dense_frac": {"max": 0.5}},
            "sae": [{"path": str(tmp_path / "crafted")}],
        },
        source="test",
        base=tmp_path,
    )
    report = evaluate(loaded, progress=False)
    result = report.saes["crafted"]
    assert result.error is None

    tokens = torch.from_numpy(np.load(tiny_tokens_file)[:16]).long()
    counted = counted_mask(tokens, result.excluded_ids)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=[HOOK])
    n = int(counted.sum())
    fires_5 = int((cache[HOOK][..., 0] > 0)[counted].sum())
    assert 0 < fires_5 < n  # the crafted latent fires on some tokens, not all
    expected_fired = np.array([n, n, 0, 0, 0, fires_5])
    np.testing.assert_array_equal(result.sums.fired, expected_fired)
    density_5 = fires_5 / n
    dense = 2 + (density_5 > threshold)
    assert result.metrics["dead_frac"].value == 3 / 6
    assert result.metrics["dense_frac"].value == dense / 6
    assert result.metrics["alive_frac"].value == 3 / 6
    assert result.verdicts["dense_frac"].passed is (dense / 6 <= 0.5)
    assert report.settings["dense_threshold"] == threshold

    json_path = tmp_path / "out" / "report.json"
    (written,) = write_densities(json_path, report)
    assert written == densities_path(json_path, "crafted") == tmp_path / "out" / "report.crafted.densities.npz"
    with np.load(written) as stored:
        np.testing.assert_allclose(stored["density"], expected_fired / n)
        np.testing.assert_array_equal(stored["fired"], expected_fired)
        assert float(stored["n_tokens"]) == n and float(stored["dense_threshold"]) == threshold


def test_latent_functions_on_counts():
    fired = np.array([0, 5, 11, 50, 0])
    np.testing.assert_allclose(latent_densities(fired, 100.0), [0, 0.05, 0.11, 0.5, 0])
    assert dead_fraction(fired) == 0.4
    assert dense_fraction(fired, 100.0, 0.1) == 0.4  # strictly more than 10%: 11 and 50
    assert dense_fraction(fired, 100.0, 0.11) == 0.2
    assert np.isnan(dense_fraction(np.zeros(0, dtype=np.int64), 100.0, 0.1))
