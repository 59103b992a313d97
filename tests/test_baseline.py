"""Regression baselines: exact zero against itself, paired power, clear errors, xdist-safe writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_topk_sae
from test_plugin import HOOK, gate  # noqa: F401  (the pytester fixture writing a thresholds file)

from sae_acceptance.sources.sae import save_sae
from sae_acceptance.stats import (
    BootstrapSettings,
    SequenceSums,
    bootstrap_intervals,
    paired_changes,
)

RUN = ("thresholds.toml", "-p", "no:cacheprovider", "--sae-no-progress")


def test_same_saes_against_their_own_baseline_change_by_exactly_zero(pytester, gate):  # noqa: F811
    gate()
    pytester.runpytest(*RUN, "--sae-update-baseline")
    baseline = json.loads((pytester.path / "thresholds.baseline.json").read_text())
    assert set(baseline["saes"]) == {"good", "bad"} and baseline["format"] == "sae-acceptance-baseline"
    result = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json", "-v")
    result.stdout.fnmatch_lines(["*thresholds.toml::good::regression_ce_rec PASSED*"])
    result.stdout.fnmatch_lines(["*good*ce_rec*+0.0000 [[]+0.0000, +0.0000[]]*ok*"])
    assert result.parseoutcomes()["passed"] == 7 + 6


def test_a_noisier_decoder_regresses_and_a_better_one_passes(pytester, gate):  # noqa: F811
    gate()
    save_sae(random_topk_sae(k=16, seed=2, hook=HOOK), pytester.path / "saes" / "bad")
    pytester.runpytest(*RUN, "--sae-update-baseline")
    worse = random_topk_sae(k=16, seed=2, hook=HOOK)
    worse.W_dec += 1.5 * torch_randn_like(worse.W_dec)
    save_sae(worse, pytester.path / "saes" / "bad")
    result = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json")
    result.stdout.fnmatch_lines(
        ["*regression: cosine * -> *: change -* [[]-*, -*[]] (paired 95% CI), tolerance 0.005 (higher is better)*"]
    )
    assert "FAILED thresholds.toml::bad::regression_cosine" in result.stdout.str()
    # the original against the noisy one as baseline: an improvement passes
    pytester.runpytest(*RUN, "--sae-update-baseline")
    save_sae(random_topk_sae(k=16, seed=2, hook=HOOK), pytester.path / "saes" / "bad")
    result = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json", "-k", "regression")
    result.assert_outcomes(passed=6, deselected=8)


def torch_randn_like(t):
    import torch

    return torch.randn(t.shape, generator=torch.Generator().manual_seed(9))


def test_paired_bootstrap_sees_what_unpaired_intervals_cannot():
    """Sequences differ a lot in loss; the candidate is worse by a small, consistent amount."""
    rng = np.random.default_rng(0)
    n = 200
    tokens = np.full(n, 255.0)
    ce_orig = rng.lognormal(5.0, 0.4, n)
    base_recon = ce_orig * rng.normal(1.2, 0.3, n)
    cand_recon = base_recon + ce_orig * rng.normal(0.02, 0.01, n)

    def sums(recon):
        scalars = {"n_tokens": tokens + 1, "n_loss": tokens, "ce_orig": ce_orig, "ce_recon": recon}
        for name in ("ce_ablate", "kl_recon", "kl_ablate", "cos", "rel_err", "sq_err", "act_sq", "l2_ratio", "l0"):
            scalars[name] = tokens.copy()
        return SequenceSums(scalars, np.zeros((n, 1)), np.ones(4, dtype=np.int64))

    settings = BootstrapSettings(2000, 0.95, 0)
    base, cand = sums(base_recon), sums(cand_recon)
    a, b = bootstrap_intervals(base, settings)["ce_rec"], bootstrap_intervals(cand, settings)["ce_rec"]
    assert a[0] < b[1] and b[0] < a[1]  # the unpaired intervals overlap
    change = paired_changes(cand, base, settings)["ce_rec"]
    assert change.ci[1] < 0  # the paired interval excludes zero: a real regression


def test_fingerprint_mismatch_corrupt_file_and_missing_entries(pytester, gate):  # noqa: F811
    gate()
    pytester.runpytest(*RUN, "--sae-update-baseline")
    gate(**{"n_sequences = 16": "n_sequences = 16\nskip = 8"})  # other eval tokens
    result = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json")
    result.stdout.fnmatch_lines(["*good was measured on something else (tokens: baseline '*', now '*'*"])
    (pytester.path / "corrupt.json").write_text("{not json")
    result = pytester.runpytest(*RUN, "--sae-baseline", "corrupt.json")
    result.stdout.fnmatch_lines(["*corrupt.json:1: not valid JSON*"])
    (pytester.path / "foreign.json").write_text('{"saes": {}}')
    result = pytester.runpytest(*RUN, "--sae-baseline", "foreign.json")
    result.stdout.fnmatch_lines(["*foreign.json: not a sae-acceptance baseline*"])
    gate()
    data = json.loads((pytester.path / "thresholds.baseline.json").read_text())
    del data["saes"]["bad"]
    (pytester.path / "thresholds.baseline.json").write_text(json.dumps(data))
    result = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json", "-rs")
    result.stdout.fnmatch_lines(["*bad: no baseline entry in * (a new SAE)*"])
    assert result.parseoutcomes()["skipped"] == 3  # bad's three gated metrics
    strict = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json", "--sae-baseline-strict")
    strict.stdout.fnmatch_lines(["*FAILED thresholds.toml::bad::regression_ce_rec*no baseline entry*"])


def test_update_under_xdist_leaves_one_valid_file(pytester, gate):  # noqa: F811
    gate()
    result = pytester.runpytest(*RUN, "--sae-update-baseline", "-n", "2", "--dist", "loadscope")
    assert result.ret == 1  # the bad SAE still fails its gate
    payload = json.loads((pytester.path / "thresholds.baseline.json").read_text())
    assert set(payload["saes"]) == {"good", "bad"}
    assert not list(pytester.path.glob(".thresholds.baseline.json.*.tmp"))
    check = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json", "-k", "regression")
    check.assert_outcomes(passed=6, deselected=8)


@pytest.mark.parametrize("metric", ["ce_rec", "cosine"])
def test_default_tolerances_are_non_negative(metric):
    from sae_acceptance.baseline import DEFAULT_TOLERANCES

    assert DEFAULT_TOLERANCES[metric] >= 0
