"""Regression baselines: exact zero against itself, paired power, clear errors, xdist-safe writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_topk_sae
from test_plugin import HOOK, gate  # noqa: F401  (the pytester fixture writing a thresholds file)

from sae_acceptance.sources.sae_io import save_sae
from sae_acceptance.stats import (
    BootstrapSettings,
    SequenceSums,
    bootstrap_intervals,
    paired_changes,
)

RUN = ("thresholds.toml", "-p", "no:cacheprovider", "--sae-no-progress")


def _settings():
    from sae_acceptance.config import EvalSettings

    return EvalSettings(data="tokens.npy", n_sequences=12, bootstrap_resamples=100)


def test_same_saes_against_their_own_baseline_change_by_exactly_zero(pytester, gate):  # noqa: F811
    gate()
    pytester.runpytest("--sae-update-baseline", *RUN)  # the flag takes no value: the path after it stays a path
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
        return SequenceSums(scalars, np.ones(4, dtype=np.int64), 1)

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


def test_one_paired_bootstrap_per_sae_and_a_missing_value_fails_only_its_item(
    pytester,
    gate,  # noqa: F811
    monkeypatch,
):
    import sae_acceptance.baseline as baseline_module

    gate()
    pytester.runpytest(*RUN, "--sae-update-baseline")
    path = pytester.path / "thresholds.baseline.json"
    data = json.loads(path.read_text())
    data["saes"]["good"]["metrics"]["cosine"]["value"] = None  # as a NaN is written
    path.write_text(json.dumps(data))
    calls = []
    real = baseline_module.paired_changes
    monkeypatch.setattr(baseline_module, "paired_changes", lambda *a: calls.append(a) or real(*a))
    result = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json", "-k", "regression")
    assert len(calls) == 2  # one per SAE, for its three regression items
    result.stdout.fnmatch_lines(
        ["*_ good::regression_cosine _*", "*thresholds.baseline.json: good has no value for cosine; refresh*"]
    )
    result.assert_outcomes(passed=5, failed=1, deselected=8)


def test_update_under_xdist_leaves_one_valid_file(pytester, gate):  # noqa: F811
    gate()
    result = pytester.runpytest(*RUN, "--sae-update-baseline", "-n", "2", "--dist", "loadscope")
    assert result.ret == 1  # the bad SAE still fails its gate
    payload = json.loads((pytester.path / "thresholds.baseline.json").read_text())
    assert set(payload["saes"]) == {"good", "bad"}
    assert not list(pytester.path.glob(".thresholds.baseline.json.*.tmp"))
    check = pytester.runpytest(*RUN, "--sae-baseline", "thresholds.baseline.json", "-k", "regression")
    check.assert_outcomes(passed=6, deselected=8)


def test_every_metric_with_a_direction_has_a_non_negative_default_tolerance():
    from sae_acceptance.metrics import METRICS

    assert all(spec.tolerance >= 0 for spec in METRICS.values())
    assert METRICS["ce_rec"].tolerance == 0.01 and METRICS["dense_frac"].tolerance == 0.01


def test_a_baseline_entry_gives_back_every_regressable_metric(tmp_path):
    """Stored sums round-trip through the files: every metric a regression item can check comes back
    exactly (mse_mean included, which divides by d_in); r2 needs the activation sums, not stored."""
    from sae_acceptance.baseline import entry_for, load_baseline, write_baseline
    from sae_acceptance.metrics import DIAGNOSTIC_SUMS, METRICS, SUM_NAMES
    from sae_acceptance.results import SAEResult

    rng = np.random.default_rng(3)
    n, d_in = 12, 48
    scalars = {name: rng.uniform(1.0, 50.0, n) for name in (*SUM_NAMES, *DIAGNOSTIC_SUMS)}
    sums = SequenceSums(scalars, rng.integers(0, 9, 64), d_in, rng.normal(size=(n, d_in)))
    path = write_baseline(tmp_path / "b.json", {"x": entry_for(SAEResult(name="x", path="x", sums=sums), _settings())})
    back = load_baseline(path).entries["x"].sums.metrics()
    original = sums.metrics()
    regressable = [m for m, spec in METRICS.items() if spec.higher_is_better is not None and spec.has_ci]
    assert "mse_mean" in regressable
    for metric in regressable:
        assert back[metric] == pytest.approx(original[metric], rel=1e-12), metric
    assert np.isnan(back["r2"]) and np.isfinite(original["r2"])


def test_a_baseline_of_an_older_format_is_refused_with_a_clear_error(tmp_path):
    from sae_acceptance.baseline import load_baseline
    from sae_acceptance.errors import BaselineError

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "sae-acceptance-baseline", "version": 1, "saes": {}}))
    with pytest.raises(BaselineError, match="baseline format version 1, this version reads 2 and 3"):
        load_baseline(old)


def test_model_identity_sees_the_weights_not_only_their_shapes(tmp_path, tiny_checkpoint):
    """A retrained checkpoint of the same shape is another model, for baselines and sweep caches."""
    import shutil

    from sae_acceptance.sources.identity import model_identity
    from sae_acceptance.train.sweep import cache_key, load_profile

    copy = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    before, key = model_identity(copy), cache_key(str(copy), "blocks.0.hook_resid_post", load_profile("tiny"), "t")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight's lowest bits: same size, same shapes
    weights.write_bytes(bytes(data))
    assert before.startswith("local:") and model_identity(copy) != before
    assert cache_key(str(copy), "blocks.0.hook_resid_post", load_profile("tiny"), "t") != key
    assert model_identity("pythia-70m") == "pythia-70m"  # hub names as given


def _entries(seed: int = 0, names=("a", "b"), n: int = 20, d_sae: int = 300) -> dict:
    """Baseline entries of synthetic results, through the product's `baseline_entries`."""
    from sae_acceptance.baseline import baseline_entries
    from sae_acceptance.config import EvalSettings
    from sae_acceptance.metrics import SUM_NAMES
    from sae_acceptance.results import EvalReport, SAEResult
    from sae_acceptance.stats import BootstrapSettings, bootstrap_intervals
    from sae_acceptance.verdict import MetricValue

    rng = np.random.default_rng(seed)
    saes = {}
    for name in names:
        sums = SequenceSums({s: rng.uniform(1.0, 50.0, n) for s in SUM_NAMES}, rng.integers(0, 900, d_sae), 16)
        cis = bootstrap_intervals(sums, BootstrapSettings(50, 0.95, 0))
        metrics = {m: MetricValue(float(v), cis.get(m)) for m, v in sums.metrics().items()}
        saes[name] = SAEResult(
            name=name,
            path=name,
            hook="blocks.0.hook_resid_post",
            tokens_fingerprint="t",
            excluded_ids=[0],
            metrics=metrics,
            sums=sums,
        )
    settings = EvalSettings(data="tokens.npy", n_sequences=n, bootstrap_resamples=100)
    return baseline_entries(EvalReport({}, {}, saes), settings)


def test_format_3_round_trips_and_reads_one_block_per_sae(tmp_path):
    from sae_acceptance.baseline import load_baseline, sidecar_path, write_baseline

    entries = _entries()
    path = write_baseline(tmp_path / "b.baseline.json", entries)
    assert sidecar_path(path) == tmp_path / "b.baseline.npz" and sidecar_path(path).exists()
    text = path.read_text()
    assert json.loads(text)["version"] == 3 and '"scalars"' not in text  # the sums live in the sidecar
    assert text.count('"fingerprint"') == 2 and '        "ce_rec": {"value": ' in text  # a line per metric
    back = load_baseline(path).entries
    for name, entry in entries.items():
        a, b = entry.sums, back[name].sums
        assert a.d_in == b.d_in and np.array_equal(a.fired, b.fired) and b.fired.dtype == np.int64
        assert set(a.scalars) == set(b.scalars)
        assert all(np.array_equal(a.scalars[k], b.scalars[k]) for k in a.scalars)  # bit for bit
        assert back[name].metrics == json.loads(json.dumps(entry.metrics))
    with np.load(sidecar_path(path), allow_pickle=False) as archive:  # a plain .npz, no pickles
        assert sorted(archive.files) == sorted(f"{n}::{k}" for n in entries for k in ("names", "sums", "fired"))


def test_a_format_2_baseline_is_read_and_converted_on_the_next_update(tmp_path):
    from sae_acceptance.baseline import load_baseline, sidecar_path, update_baseline

    entries = _entries()
    inline = {  # format 2: sums inline as lists
        name: {
            "fingerprint": e.fingerprint,
            "metrics": {m: {"value": v} for m, v in e.metrics.items()},
            "sums": {
                "d_in": e.sums.d_in,
                "scalars": {k: v.tolist() for k, v in e.sums.scalars.items()},
                "fired": e.sums.fired.tolist(),
            },
        }
        for name, e in entries.items()
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "sae-acceptance-baseline", "version": 2, "saes": inline}))
    old = load_baseline(path).entries
    assert np.array_equal(old["a"].sums.fired, entries["a"].sums.fired)
    update_baseline(path, _entries(seed=1, names=("c",)))
    assert json.loads(path.read_text())["version"] == 3 and sidecar_path(path).exists()
    new = load_baseline(path).entries
    assert sorted(new) == ["a", "b", "c"]
    assert np.array_equal(new["b"].sums.scalars["ce_recon"], entries["b"].sums.scalars["ce_recon"])


def test_an_unchanged_refresh_is_byte_identical_and_a_moved_sae_changes_only_its_block(tmp_path):
    from sae_acceptance.baseline import UNCHANGED_RTOL, sidecar_path, update_baseline

    path = tmp_path / "b.json"
    update_baseline(path, _entries())
    before = path.read_bytes(), sidecar_path(path).read_bytes()
    update_baseline(path, _entries())
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    nudged = _entries()  # within the tolerance: the stored entry stays, sums and all
    nudged["a"].metrics["ce_rec"] *= 1 + UNCHANGED_RTOL / 10
    nudged["a"].sums.fired[0] += 1
    update_baseline(path, nudged)
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    moved = _entries()
    moved["b"].metrics["cosine"] *= 1 + 100 * UNCHANGED_RTOL
    update_baseline(path, moved)
    old, new = before[0].decode().splitlines(), path.read_text().splitlines()
    changed = [i for i, (x, y) in enumerate(zip(old, new, strict=True)) if x != y]
    assert len(changed) == 1 and '"cosine"' in new[changed[0]]
    assert new.index('    "b": {') < changed[0]  # inside b's block


def test_a_corrupt_sidecar_is_one_line_and_a_corrupt_baseline_is_replaced_only_when_forced(tmp_path):
    from sae_acceptance.baseline import load_baseline, sidecar_path, update_baseline
    from sae_acceptance.errors import BaselineError

    path = tmp_path / "b.json"
    update_baseline(path, _entries())
    sidecar = sidecar_path(path)
    good = sidecar.read_bytes()
    for damage in (b"not a zip at all", good[: len(good) // 2]):
        sidecar.write_bytes(damage)
        with pytest.raises(BaselineError) as err:
            load_baseline(path)
        assert str(sidecar) in str(err.value) and "\n" not in str(err.value)
        assert "corrupt baseline sidecar" in str(err.value)
    sidecar.write_bytes(good)
    other = tmp_path / "other.json"
    update_baseline(other, _entries(seed=5))
    sidecar.write_bytes(sidecar_path(other).read_bytes())  # a sidecar of another write
    with pytest.raises(BaselineError, match=r"b\.npz: the sums of a do not match b\.json"):
        load_baseline(path)
    sidecar.unlink()
    with pytest.raises(BaselineError, match=r"b\.npz: missing"):
        load_baseline(path)
    path.write_text("{not json")
    with pytest.raises(BaselineError, match=r"b\.json:1: not valid JSON.*not overwritten") as refused:
        update_baseline(path, _entries())
    assert refused.value.remedy == "force"
    update_baseline(path, _entries(), force=True)
    assert sorted(load_baseline(path).entries) == ["a", "b"]


def test_a_baseline_is_checked_before_anything_is_evaluated_and_refusals_name_the_caller_s_flag(
    pytester,
    gate,  # noqa: F811
    capsys,
):
    """An unreadable baseline stops the run at collection, once, before any model loads: under
    pytest with pytest's flag, under the CLI with the CLI's. pytest says where a refresh wrote,
    and a refused refresh is the closing line's error, not a pass with exit status 2."""
    from sae_acceptance.cli import main

    gate()
    (pytester.path / "corrupt.json").write_text("{not json")
    result = pytester.runpytest(*RUN, "--sae-baseline", "corrupt.json")
    assert result.ret == 2 and "evaluating" not in result.stdout.str()
    assert result.stdout.str().count("corrupt.json:1: not valid JSON") == 1  # once, for the whole file
    result.stdout.fnmatch_lines(["*--sae-update-baseline=force replaces it*", "*1 error*"])
    refused = pytester.runpytest(*RUN, "--sae-update-baseline", "--sae-baseline", "corrupt.json")
    assert refused.ret == 2 and "passed" not in refused.stdout.lines[-1]
    refused.stdout.fnmatch_lines(["*corrupt.json:1: not valid JSON*", "*1 error*"])
    written = pytester.runpytest(*RUN, "--sae-update-baseline")
    written.stdout.fnmatch_lines(["*baseline written to *thresholds.baseline.json (2 entries refreshed)*"])
    capsys.readouterr()
    toml = pytester.path / "thresholds.toml"
    assert main(["eval", "--config", str(toml), "--baseline", str(pytester.path / "corrupt.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--update-baseline=force replaces it" in err[0] and "--sae-" not in err[0], err
