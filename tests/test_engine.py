"""The tail-pass engine against plain forward passes with a replacement hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import D_MODEL, identity_sae, random_topk_sae, zero_sae

from sae_acceptance.engine import run_hook
from sae_acceptance.sources.model import special_token_ids
from sae_acceptance.sources.tokens import counted_mask

HOOKS = [
    "blocks.1.hook_resid_post",
    "blocks.0.hook_resid_pre",
    "blocks.2.hook_resid_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.attn.hook_z",
]


def plain_losses(model, tokens, hook, sae, counted):
    """Independent path: one full forward pass per variant, the SAE spliced in by a hook."""

    def splice(act, hook):
        flat = act.reshape(act.shape[0] * act.shape[1], -1)
        recon = sae.reconstruct(flat)[0].reshape(act.shape)
        keep = counted.reshape(*counted.shape, *([1] * (act.ndim - 2)))
        return torch.where(keep, recon, act)

    with torch.no_grad():
        orig = model(tokens, return_type="loss", loss_per_token=True)
        recon = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, splice)])
    return orig.double(), recon.double()


@pytest.mark.parametrize("hook", HOOKS)
def test_tail_pass_losses_equal_full_forward_with_hook(tiny_model, tiny_tokens, hook):
    """Per-sequence CE sums agree with a plain hooked forward pass to 1e-5 nats per token."""
    counted = counted_mask(tiny_tokens, special_token_ids(tiny_model))
    sae = random_topk_sae(k=4)
    run = run_hook(tiny_model, hook, {"sae": sae}, tiny_tokens, counted, batch_size=5, progress=False)
    orig, recon = plain_losses(tiny_model, tiny_tokens, hook, sae, counted)
    loss_mask = counted[:, :-1].double()
    sums = run.sums["sae"].scalars
    n_loss = loss_mask.sum(1).numpy()
    np.testing.assert_allclose(sums["n_loss"], n_loss)
    np.testing.assert_allclose(
        sums["ce_orig"] / n_loss, ((orig * loss_mask).sum(1) / loss_mask.sum(1)).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        sums["ce_recon"] / n_loss, ((recon * loss_mask).sum(1) / loss_mask.sum(1)).numpy(), atol=1e-5
    )
    assert not np.allclose(sums["ce_recon"], sums["ce_orig"])  # the splice really changed something


def test_identity_sae_is_perfect_and_zero_sae_is_ablation(tiny_model, tiny_tokens):
    counted = counted_mask(tiny_tokens, special_token_ids(tiny_model))
    hook = "blocks.1.hook_resid_post"
    run = run_hook(tiny_model, hook, {"id": identity_sae(), "zero": zero_sae()}, tiny_tokens, counted, 8, False)
    ident, zero = run.sums["id"].metrics(), run.sums["zero"].metrics()
    assert ident["ce_rec"] == 1.0
    assert ident["r2"] == pytest.approx(1.0, abs=1e-12)
    assert ident["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_div"] == pytest.approx(0.0, abs=1e-7)
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-12)
    assert zero["ce_recon"] == zero["ce_ablate"]
    assert zero["ce_loss_score"] == 0.0
    assert zero["kl_div_score"] == pytest.approx(0.0, abs=1e-12)
    assert zero["cosine"] == 0.0 and zero["rel_error"] == pytest.approx(1.0)


def test_batch_size_does_not_change_the_sums(tiny_model, tiny_tokens):
    counted = counted_mask(tiny_tokens, special_token_ids(tiny_model))
    sae = {"s": random_topk_sae(k=8, seed=3)}
    a = run_hook(tiny_model, "blocks.1.hook_resid_post", sae, tiny_tokens, counted, 3, False).sums["s"]
    b = run_hook(tiny_model, "blocks.1.hook_resid_post", sae, tiny_tokens, counted, 24, False).sums["s"]
    for name in a.scalars:
        np.testing.assert_allclose(a.scalars[name], b.scalars[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(a.fired, b.fired)


def test_special_tokens_are_excluded_and_keep_their_activation(tiny_model, tiny_tokens):
    """Excluded positions: not counted, and not patched (the splice leaves them alone)."""
    special = special_token_ids(tiny_model)
    assert (torch.isin(tiny_tokens, torch.tensor(special))).any()
    counted = counted_mask(tiny_tokens, special)
    sums = run_hook(tiny_model, "blocks.1.hook_resid_post", {"z": zero_sae()}, tiny_tokens, counted, 8, False).sums["z"]
    assert sums.scalars["n_tokens"].sum() == counted.sum()
    everything = torch.ones_like(counted)
    all_sums = run_hook(
        tiny_model, "blocks.1.hook_resid_post", {"z": zero_sae()}, tiny_tokens, everything, 8, False
    ).sums["z"]
    assert all_sums.scalars["n_tokens"].sum() == tiny_tokens.numel()
    assert all_sums.scalars["ce_recon"].sum() != sums.scalars["ce_recon"].sum()


def test_reconstruction_metrics_match_an_independent_computation(tiny_model, tiny_tokens):
    hook = "blocks.1.hook_resid_post"
    counted = counted_mask(tiny_tokens, special_token_ids(tiny_model))
    sae = random_topk_sae(k=4, seed=1)
    sums = run_hook(tiny_model, hook, {"s": sae}, tiny_tokens, counted, 7, False).sums["s"]
    m = sums.metrics()
    _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter=hook)
    a = cache[hook][counted].double()
    recon, code = sae.reconstruct(a.float())
    r = recon.double()
    z = code.dense(sae.d_sae)
    err = (a - r).pow(2).sum(-1)
    assert m["mse_sum"] == pytest.approx(float(err.mean()), rel=1e-5)
    assert m["mse_mean"] == pytest.approx(float(err.mean()) / D_MODEL, rel=1e-5)
    assert m["r2"] == pytest.approx(float(1 - err.sum() / (a - a.mean(0)).pow(2).sum()), rel=1e-6)
    cos = (a * r).sum(-1) / (a.norm(dim=-1) * r.norm(dim=-1))
    assert m["cosine"] == pytest.approx(float(cos.mean()), rel=1e-5)
    assert m["rel_error"] == pytest.approx(float((err.sqrt() / a.norm(dim=-1)).mean()), rel=1e-5)
    assert m["l2_ratio"] == pytest.approx(float((r.norm(dim=-1) / a.norm(dim=-1)).mean()), rel=1e-5)
    assert m["l0"] == pytest.approx(float((z != 0).sum(-1).double().mean()), rel=1e-9)
    np.testing.assert_array_equal(sums.fired, (z != 0).sum(0).numpy())
