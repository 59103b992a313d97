"""Differential test: our evaluation against SAELens `run_evals` on identical inputs.

One tiny GPT-NeoX, SAEs written with `save_sae` (SAELens v6 layout) and read back
by both libraries, one token set. SAELens gets the tokens through a real
`ActivationsStore` over an in-memory pre-tokenized dataset; we record what its
store handed out and check it is exactly our eval set, in both of its phases.

What agrees, and to what tolerance, is stated per assertion and explained in
docs/metrics.md ("Differential test against SAELens"):

- pooled means (ce_*, kl_div, mse, cosine, l2_ratio, r2, l0): relative 1e-5
  (float32 per-token values, SAELens averages them in float32, we sum in
  float64; the observed gap is about 1e-7);
- ce_loss_score and kl_div_score: ratios of differences of those means, so their
  tolerance is the means' tolerance propagated through the formula;
- latent firing counts: exactly.

Where the definitions differ (SAELens zero-ablates special-token positions, its
legacy explained variance, metrics it does not have) ours is checked against an
independent float64 computation instead.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import D_MODEL, VOCAB, random_topk_sae

from sae_acceptance.config import thresholds_from_mapping
from sae_acceptance.engine import run_hook
from sae_acceptance.evaluate import evaluate
from sae_acceptance.metrics import rate_bits
from sae_acceptance.reference.language import BOS, EOS, TopicLanguage
from sae_acceptance.sources.model import ModelCache, special_token_ids
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import load_sae, save_sae
from sae_acceptance.sources.tokens import counted_mask

sae_lens = pytest.importorskip("sae_lens")
datasets = pytest.importorskip("datasets")
from sae_lens.evals import get_eval_everything_config, run_evals  # noqa: E402
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402

N_SEQ, CTX, BATCH = 32, 32, 8
RTOL = 1e-5  # relative, for pooled means of the same float32 per-token quantities
ATOL = 1e-6  # absolute floor (nats, or the metric's units) for values near zero

# SAELens result name -> our metric name, for the pooled means.
SAME_MEANS = {
    "ce_loss_without_sae": "ce_orig",
    "ce_loss_with_sae": "ce_recon",
    "ce_loss_with_ablation": "ce_ablate",
    "kl_div_with_sae": "kl_div",
    "mse": "mse_sum",
    "cossim": "cosine",
    "l2_ratio": "l2_ratio",
    "l0": "l0",
    "explained_variance": "r2",
}


def mean_tolerance(their_name: str, theirs: float) -> float:
    """RTOL relative, except r2 = 1 − SSE/SST: there it is SSE/SST that is known to RTOL."""
    scale = abs(1.0 - theirs) if their_name == "explained_variance" else abs(theirs)
    return max(RTOL * scale, ATOL)


def standard_sae(hook: str, d_sae: int = 64, seed: int = 1) -> SAE:
    """A ReLU SAE with unit-norm random decoder rows and a negative encoder bias."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, D_MODEL, generator=g), dim=1)
    return SAE(
        w_dec.T.clone(),
        torch.full((d_sae,), -0.2),
        w_dec,
        torch.randn(D_MODEL, generator=g) * 0.1,
        architecture="standard",
        hook_name=hook,
        model_name="tiny",
    )


def gated_sae(hook: str, seed: int = 5) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(64, D_MODEL, generator=g), dim=1)
    return SAE(
        w_dec.T.clone(),
        torch.full((64,), -0.1),
        w_dec,
        torch.randn(D_MODEL, generator=g) * 0.1,
        architecture="gated",
        b_mag=torch.randn(64, generator=g) * 0.1,
        r_mag=torch.randn(64, generator=g) * 0.2,
        hook_name=hook,
        model_name="tiny",
    )


def jumprelu_sae(hook: str, seed: int = 6) -> SAE:
    sae = standard_sae(hook, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return SAE(
        sae.W_enc,
        torch.zeros(64),
        sae.W_dec,
        sae.b_dec,
        architecture="jumprelu",
        threshold=torch.rand(64, generator=g) * 0.4,
        apply_b_dec_to_input=False,
        hook_name=hook,
        model_name="tiny",
    )


def dictionary_learning_sae(dict_class: str, seed: int) -> SAE:
    """A dictionary_learning `ae.pt` + `config.json` (layer 1), read by `load_sae`."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(64, D_MODEL, generator=g), dim=1)
    state = {
        "encoder.weight": w_dec.clone(),
        "encoder.bias": torch.zeros(64),
        "decoder.weight": w_dec.T.clone(),
        "b_dec": torch.randn(D_MODEL, generator=g) * 0.1,
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(0.3),
    }
    trainer = {
        "dict_class": dict_class,
        "activation_dim": D_MODEL,
        "dict_size": 64,
        "k": 4,
        "layer": 1,
        "lm_name": "tiny",
    }
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "ae.pt")
        (Path(tmp) / "config.json").write_text(json.dumps({"trainer": trainer}))
        return load_sae(tmp)


# Three engine paths: a residual hook (tail from the next block), a hook inside a
# block (the block is rerun), and attention's hook_z (heads flattened to d_model).
# The hooks are ones where zero-ablation moves the loss, so the scores are not
# dominated by a near-zero denominator.
CASES = {
    "topk-resid_post": lambda: random_topk_sae(k=4, seed=0, hook="blocks.1.hook_resid_post"),
    "standard-mlp_out": lambda: standard_sae("blocks.1.hook_mlp_out"),
    "topk-hook_z": lambda: random_topk_sae(k=4, seed=3, hook="blocks.0.attn.hook_z"),
    # the architectures people train, through SAELens's own classes on the same directory
    "gated-resid_post": lambda: gated_sae("blocks.1.hook_resid_post"),
    "jumprelu-mlp_out": lambda: jumprelu_sae("blocks.1.hook_mlp_out"),
    "dl_batchtopk_as_jumprelu-resid_post": lambda: dictionary_learning_sae("BatchTopKSAE", 7),
    "dl_topk-resid_post": lambda: dictionary_learning_sae("AutoEncoderTopK", 8),
}


def topic_tokens(with_special: bool) -> torch.Tensor:
    """[N_SEQ, CTX] tokens of the synthetic language; without specials, BOS/EOS become words."""
    tokens = TopicLanguage(VOCAB, n_topics=4, seed=0).sequences(N_SEQ, CTX, seed=2)
    if not with_special:
        words = 3 + (np.arange(tokens.size).reshape(tokens.shape) * 7) % (VOCAB - 3)
        tokens = np.where(tokens < 3, words, tokens)
    return torch.from_numpy(tokens)


def flat(metrics: dict) -> dict[str, float]:
    return {name: value for group in metrics.values() for name, value in group.items()}


def run_saelens(model, sae_dir, tokens: torch.Tensor):
    """SAELens `run_evals` with every metric on; also returns the batches its store served."""
    dataset = datasets.Dataset.from_dict({"tokens": tokens.tolist()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl_sae = sae_lens.SAE.load_from_disk(str(sae_dir))
        store = ActivationsStore.from_sae(
            model,
            sl_sae,
            dataset,
            streaming=False,
            context_size=CTX,
            store_batch_size_prompts=BATCH,
            total_tokens=N_SEQ,
        )
        served: list[torch.Tensor] = []
        get_batch = store.get_batch_tokens

        def recording(*args, **kwargs):
            batch = get_batch(*args, **kwargs)
            served.append(batch.clone())
            return batch

        store.get_batch_tokens = recording
        n_batches = N_SEQ // BATCH
        config = get_eval_everything_config(
            batch_size_prompts=BATCH,
            n_eval_reconstruction_batches=n_batches,
            n_eval_sparsity_variance_batches=n_batches,
        )
        metrics, feature_metrics = run_evals(
            sl_sae, store, model, ActivationScaler(), config, exclude_special_tokens=True
        )
    return flat(metrics), feature_metrics, served


@pytest.fixture(scope="module")
def plain_tokens() -> torch.Tensor:
    tokens = topic_tokens(with_special=False)
    assert not torch.isin(tokens, torch.tensor([0, 1, 2])).any()
    return tokens


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tiny_model, plain_tokens, tmp_path_factory):
    """Per case: SAELens' results and our `evaluate` result on the same SAE directory and tokens."""
    root = tmp_path_factory.mktemp("differential")
    tokens_path = root / "tokens.npy"
    np.save(tokens_path, plain_tokens.numpy())
    out = {}
    models = ModelCache()
    for case, build in CASES.items():
        sae_dir = save_sae(build(), root / case)
        theirs, features, served = run_saelens(tiny_model, sae_dir, plain_tokens)
        loaded = thresholds_from_mapping(
            {
                "eval": {
                    "data": str(tokens_path),
                    "model": str(tiny_checkpoint),
                    "n_sequences": N_SEQ,
                    "context_size": CTX,
                    "batch_size": BATCH,
                    "device": "cpu",
                    "bootstrap_resamples": 100,
                },
                "sae": [{"path": str(sae_dir), "name": case}],
            },
            source="differential test",
            base=root,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = evaluate(loaded, progress=False, models=models).saes[case]
        assert ours.error is None, ours.error
        out[case] = (theirs, features, served, ours)
    return out


def ours_value(result, name: str) -> float:
    if name == "kl_ablate":  # not a reported metric; from the same per-sequence sums
        sums = result.sums.scalars
        return float(sums["kl_ablate"].sum() / sums["n_tokens"].sum())
    return result.metrics[name].value


def assert_close(ours: float, theirs: float, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert math.isfinite(ours) and math.isfinite(theirs), f"{what}: ours {ours}, SAELens {theirs}"
    tol = max(rtol * abs(theirs), atol)
    assert abs(ours - theirs) <= tol, (
        f"{what}: ours {ours!r} vs SAELens {theirs!r}: |diff| {abs(ours - theirs):.3g} > {tol:.3g}"
    )


def score_tolerance(ablate: float, patched: float, orig: float, score: float) -> float:
    """Tolerance of s = (A − P)/(A − O) when A, P, O each carry RTOL relative (ATOL floor).

    |∂s/∂A| = |P − O|/(A − O)², |∂s/∂P| = 1/|A − O|, |∂s/∂O| = |s|/|A − O|.
    """
    tol = [max(RTOL * abs(x), ATOL) for x in (ablate, patched, orig)]
    den = abs(ablate - orig)
    return abs(patched - orig) / den**2 * tol[0] + tol[1] / den + abs(score) / den * tol[2]


@pytest.mark.parametrize("case", CASES)
def test_saelens_sees_exactly_our_eval_set(runs, plain_tokens, case):
    theirs, _, served, ours = runs[case]
    n_batches = N_SEQ // BATCH
    # Its store's reset does not rewind the sequence iterator: the sparsity/variance
    # phase sees our tokens again only because the dataset holds exactly one pass.
    assert len(served) == 2 * n_batches
    assert torch.equal(torch.cat(served[:n_batches]), plain_tokens)
    assert torch.equal(torch.cat(served[n_batches:]), plain_tokens)
    assert theirs["total_tokens_eval_reconstruction"] == N_SEQ * CTX
    assert float(ours.sums.scalars["n_tokens"].sum()) == N_SEQ * CTX  # nothing excluded here
    assert float(ours.sums.scalars["n_loss"].sum()) == N_SEQ * (CTX - 1)


@pytest.mark.parametrize("case", CASES)
def test_pooled_means_agree(runs, case):
    theirs, _, _, ours = runs[case]
    for their_name, our_name in SAME_MEANS.items():
        assert_close(
            ours_value(ours, our_name),
            theirs[their_name],
            f"{our_name} ~ {their_name}",
            rtol=0,
            atol=mean_tolerance(their_name, theirs[their_name]),
        )
    assert_close(
        ours_value(ours, "kl_ablate"),
        theirs["kl_div_with_ablation"],
        "kl_ablate ~ kl_div_with_ablation",
    )
    # Derived from the same means: ours divides the same sums differently.
    assert_close(ours_value(ours, "mse_mean"), theirs["mse"] / D_MODEL, "mse_mean ~ mse / d_in")
    ratio = theirs["ce_loss_with_sae"] / theirs["ce_loss_without_sae"]
    assert_close(
        ours_value(ours, "ce_rec"),
        2.0 - ratio,
        "ce_rec ~ 2 − with_sae/without_sae",
        rtol=0,
        atol=2 * RTOL * abs(ratio),  # a ratio of two means, each to RTOL
    )


@pytest.mark.parametrize("case", CASES)
def test_scores_agree_to_propagated_tolerance(runs, case):
    theirs, _, _, ours = runs[case]
    a, p, o = (theirs[f"ce_loss_{s}"] for s in ("with_ablation", "with_sae", "without_sae"))
    score = theirs["ce_loss_score"]
    assert abs(a - o) > 0.05  # the case is chosen so that the score is well conditioned
    assert_close(
        ours_value(ours, "ce_loss_score"),
        score,
        "ce_loss_score",
        rtol=0,
        atol=score_tolerance(a, p, o, score),
    )
    kl_a, kl_p, kl_score = (
        theirs["kl_div_with_ablation"],
        theirs["kl_div_with_sae"],
        theirs["kl_div_score"],
    )
    assert_close(
        ours_value(ours, "kl_div_score"),
        kl_score,
        "kl_div_score",
        rtol=0,
        atol=score_tolerance(kl_a, kl_p, 0.0, kl_score),
    )


@pytest.mark.parametrize("case", CASES)
def test_latent_firing_counts_agree_exactly(runs, case):
    _, features, _, ours = runs[case]
    density = np.asarray(features["feature_density"], dtype=np.float64)
    counts = np.rint(density * N_SEQ * CTX).astype(np.int64)
    np.testing.assert_array_equal(ours.sums.fired, counts)
    assert ours.metrics["alive_frac"].value == float((density > 0).mean())
    assert ours.metrics["rate_bits"].value == pytest.approx(rate_bits(counts, N_SEQ * CTX), rel=1e-12)


def _activations(model, hook: str, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook].flatten(2)


def test_metrics_without_a_saelens_twin_match_their_own_definition(runs, tiny_model, plain_tokens):
    """rel_error, r2 and SSE/SST per token recomputed independently in float64.

    SAELens' `explained_variance_legacy` (batch-centred, a mean of per-token ratios)
    is not our r2, and this checks that it really differs here.
    """
    theirs, _, _, ours = runs["topk-resid_post"]
    sae = CASES["topk-resid_post"]()
    a = _activations(tiny_model, sae.hook_name, plain_tokens).reshape(-1, D_MODEL)
    r = sae.reconstruct(a)[0].double()
    a = a.double()
    err = (a - r).pow(2).sum(-1)
    sse, sst = err.sum(), (a - a.mean(0)).pow(2).sum()
    n = a.shape[0]
    expected = {
        "rel_error": float((err.sqrt() / a.norm(dim=-1)).mean()),
        "r2": float(1 - sse / sst),
        "sse_per_token": float(sse / n),
        "sst_per_token": float(sst / n),
        "mse_mean": float(sse / (n * D_MODEL)),
        "cosine": float(torch.nn.functional.cosine_similarity(a, r, dim=-1).mean()),
    }
    for name, value in expected.items():
        assert_close(ours_value(ours, name), value, f"{name} (independent float64)")

    batches = a.reshape(N_SEQ // BATCH, BATCH * CTX, D_MODEL)
    r_batches = r.reshape(batches.shape)
    per_token = 1 - (batches - r_batches).pow(2).sum(-1) / (batches - batches.mean(1, keepdim=True)).pow(2).sum(-1)
    assert_close(float(per_token.mean()), theirs["explained_variance_legacy"], "legacy EV formula")
    assert abs(ours_value(ours, "r2") - theirs["explained_variance_legacy"]) > 1e-3


def _hooked_logits(model, tokens: torch.Tensor, hook: str, fn=None) -> torch.Tensor:
    with torch.no_grad():
        if fn is None:
            return model(tokens).double()
        return model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)]).double()


def _ce_kl(tokens, orig, variant, counted) -> tuple[float, float]:
    """Pooled next-token CE of `variant` and KL(orig || variant), SAELens' counted-token rule."""
    logp = variant.log_softmax(-1)
    ce = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    logq = orig.log_softmax(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    loss_mask = counted[:, :-1]
    return float(ce[loss_mask].mean()), float(kl[counted].mean())


def test_special_tokens_zero_ablation_is_the_one_difference(tiny_model, tmp_path):
    """With BOS/EOS in the data both libraries splice and average the same positions,
    so every metric agrees except the zero-ablated pass: SAELens zeroes every position,
    we keep the excluded positions' original activation. Each side is checked against
    its own independent full forward pass."""
    tokens = topic_tokens(with_special=True)
    counted = counted_mask(tokens, special_token_ids(tiny_model))
    assert (~counted).sum() >= 8 and torch.equal(~counted, torch.isin(tokens, torch.tensor([BOS, EOS])))
    sae = CASES["topk-resid_post"]()
    hook = sae.hook_name
    theirs, _, _ = run_saelens(tiny_model, save_sae(sae, tmp_path / "sae"), tokens)
    run = run_hook(tiny_model, hook, {"sae": sae}, tokens, counted, batch_size=BATCH, progress=False)
    sums = run.sums["sae"]
    ours = {name: float(v) for name, v in sums.metrics().items()}
    ours["kl_ablate"] = float(sums.scalars["kl_ablate"].sum() / sums.scalars["n_tokens"].sum())

    same = {k: v for k, v in SAME_MEANS.items() if k != "ce_loss_with_ablation"}
    for their_name, our_name in same.items():
        assert_close(
            ours[our_name],
            theirs[their_name],
            f"{our_name} ~ {their_name} (special tokens)",
            rtol=0,
            atol=mean_tolerance(their_name, theirs[their_name]),
        )

    keep = counted[..., None]
    orig = _hooked_logits(tiny_model, tokens, hook)
    ablate_all = _hooked_logits(tiny_model, tokens, hook, lambda act, hook: torch.zeros_like(act))
    ablate_counted = _hooked_logits(
        tiny_model, tokens, hook, lambda act, hook: torch.where(keep, torch.zeros_like(act), act)
    )
    ce_all, kl_all = _ce_kl(tokens, orig, ablate_all, counted)
    ce_counted, kl_counted = _ce_kl(tokens, orig, ablate_counted, counted)
    assert_close(theirs["ce_loss_with_ablation"], ce_all, "SAELens ce_loss_with_ablation ~ ablate all")
    assert_close(theirs["kl_div_with_ablation"], kl_all, "SAELens kl_div_with_ablation ~ ablate all")
    assert_close(ours["ce_ablate"], ce_counted, "ce_ablate ~ ablate counted positions only")
    assert_close(ours["kl_ablate"], kl_counted, "kl_ablate ~ ablate counted positions only")
    # ... and the two conventions really give different numbers on this data.
    assert abs(ce_all - ce_counted) > 100 * RTOL * ce_all
    assert abs(kl_all - kl_counted) > 100 * RTOL * kl_all
