"""run_model: one original pass for every hook; splices; transcoders and single-head SAEs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_topk_sae

from sae_acceptance.engine import run_hook, run_model
from sae_acceptance.sources.model import special_token_ids
from sae_acceptance.sources.tokens import counted_mask

HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.attn.hook_z",
    "blocks.2.hook_resid_post",
]


@pytest.fixture(scope="module")
def counted(tiny_model, tiny_tokens):
    return counted_mask(tiny_tokens, special_token_ids(tiny_model))


def _saes(seed: int):
    return {"k4": random_topk_sae(k=4, seed=seed), "k8": random_topk_sae(k=8, seed=seed + 1)}


def _assert_same(a, b):
    assert a.scalars.keys() == b.scalars.keys()
    for key in a.scalars:
        np.testing.assert_array_equal(a.scalars[key], b.scalars[key], err_msg=key)
    np.testing.assert_array_equal(a.fired, b.fired)
    np.testing.assert_array_equal(a.shift_sums, b.shift_sums)


def test_shared_pass_equals_per_hook_runs_exactly(tiny_model, tiny_tokens, counted):
    by_hook = {hook: _saes(seed) for seed, hook in enumerate(HOOKS)}
    shared = run_model(tiny_model, by_hook, tiny_tokens, counted, batch_size=5, progress=False)
    assert set(shared.hooks) == set(HOOKS) and shared.n_positions == tiny_tokens.numel()
    for hook, saes in by_hook.items():
        alone = run_hook(tiny_model, hook, saes, tiny_tokens, counted, batch_size=5, progress=False)
        for name in saes:
            _assert_same(shared.hooks[hook].sums[name], alone.sums[name])
        np.testing.assert_array_equal(shared.hooks[hook].covariance.covariance(), alone.covariance.covariance())


def _hand_written(model, tokens, replace: dict):
    """Per-token CE of one plain forward with `replace` ({hook: fn(act)}) hooked in."""
    hooks = [(hook, lambda act, hook, fn=fn: fn(act)) for hook, fn in replace.items()]
    with torch.no_grad():
        return model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=hooks).double()


def _splice_fn(sae, counted):
    def fn(act):
        recon = sae.reconstruct(act.reshape(-1, sae.d_in))[0].reshape(act.shape)
        return torch.where(counted.reshape(*counted.shape, *[1] * (act.ndim - 2)), recon, act)

    return fn


def _mean_ce(ce, counted):
    loss_mask = counted[:, :-1].double()
    return ((ce * loss_mask).sum(1) / loss_mask.sum(1)).numpy()


def test_splice_equals_a_forward_with_every_hook_replaced(tiny_model, tiny_tokens, counted):
    members = {
        "blocks.0.hook_resid_post": random_topk_sae(k=8, seed=1),
        "blocks.1.attn.hook_z": random_topk_sae(k=8, seed=2),
        "blocks.2.hook_mlp_out": random_topk_sae(k=8, seed=3),
    }
    run = run_model(tiny_model, {}, tiny_tokens, counted, batch_size=7, progress=False, splices={"all": members})
    sums = run.splices["all"].scalars
    n_loss = sums["n_loss"]
    want = _hand_written(tiny_model, tiny_tokens, {h: _splice_fn(s, counted) for h, s in members.items()})
    np.testing.assert_allclose(sums["ce_recon"] / n_loss, _mean_ce(want, counted), atol=1e-5)
    zero = {
        h: (lambda act: torch.where(counted.reshape(*counted.shape, *[1] * (act.ndim - 2)), 0.0, act)) for h in members
    }
    np.testing.assert_allclose(
        sums["ce_ablate"] / n_loss, _mean_ce(_hand_written(tiny_model, tiny_tokens, zero), counted), atol=1e-5
    )
    # patching all three together is not any one of them alone
    alone = run_model(tiny_model, {h: {"s": s} for h, s in members.items()}, tiny_tokens, counted, 7, False)
    for hook in members:
        assert not np.allclose(alone.hooks[hook].sums["s"].scalars["ce_recon"], sums["ce_recon"])
    metrics = run.splices["all"].metrics()
    # A splice has only the joint loss, no per-SAE reconstruction numbers.
    assert np.isfinite(metrics["ce_rec"]) and np.isfinite(metrics["kl_div"]) and "cosine" not in metrics


@pytest.mark.parametrize("hook", HOOKS)
def test_splice_of_one_equals_the_sae_alone_exactly(tiny_model, tiny_tokens, counted, hook):
    sae = random_topk_sae(k=4, seed=5)
    run = run_model(tiny_model, {hook: {"s": sae}}, tiny_tokens, counted, 5, False, splices={"one": {hook: sae}})
    own, splice = run.hooks[hook].sums["s"].scalars, run.splices["one"].scalars
    for key in ("n_tokens", "n_loss", "ce_orig", "ce_recon", "ce_ablate", "kl_ablate", "kl_recon"):
        np.testing.assert_array_equal(splice[key], own[key], err_msg=key)


def test_transcoder_reads_one_hook_and_replaces_another(tiny_model, tiny_tokens, counted):
    """Reconstruction metrics compare against the out hook; the loss is a forward with it replaced."""
    tc = random_topk_sae(k=8, seed=7)
    tc.hook_name_out = "blocks.1.hook_mlp_out"
    hook_in = "blocks.1.ln2.hook_normalized"
    run = run_model(tiny_model, {hook_in: {"tc": tc}}, tiny_tokens, counted, 6, False, splices={"tc": {hook_in: tc}})
    sums = run.hooks[hook_in].sums["tc"]
    _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter=[hook_in, tc.hook_name_out])
    x, y = cache[hook_in][counted], cache[tc.hook_name_out][counted].double()
    r = tc.reconstruct(x)[0].double()
    assert sums.metrics()["mse_sum"] == pytest.approx(float((y - r).pow(2).sum(-1).mean()), rel=1e-5)
    live = {}
    replace = {
        hook_in: lambda act: live.setdefault("x", act),
        tc.hook_name_out: lambda act: torch.where(
            counted[..., None], tc.reconstruct(live["x"].reshape(-1, 32))[0].reshape(act.shape), act
        ),
    }
    want = _mean_ce(_hand_written(tiny_model, tiny_tokens, replace), counted)
    n_loss = sums.scalars["n_loss"]
    np.testing.assert_allclose(sums.scalars["ce_recon"] / n_loss, want, atol=1e-5)
    np.testing.assert_allclose(run.splices["tc"].scalars["ce_recon"] / n_loss, want, atol=1e-5)
    zero_out = {tc.hook_name_out: lambda act: torch.where(counted[..., None], 0.0, act)}
    np.testing.assert_allclose(
        sums.scalars["ce_ablate"] / n_loss,
        _mean_ce(_hand_written(tiny_model, tiny_tokens, zero_out), counted),
        atol=1e-5,
    )


def test_single_head_sae_replaces_only_its_head(tiny_model, tiny_tokens, counted):
    hook, head, d_head = "blocks.1.attn.hook_z", 2, 8
    sae = random_topk_sae(d=d_head, d_sae=32, k=2, seed=9)
    sae.hook_head_index = head
    sums = run_model(tiny_model, {hook: {"h": sae}}, tiny_tokens, counted, 8, False).hooks[hook].sums["h"]

    def one_head(act):
        out = act.clone()
        recon = sae.reconstruct(act[:, :, head].reshape(-1, d_head))[0].reshape(act[:, :, head].shape)
        out[:, :, head] = torch.where(counted[..., None], recon, act[:, :, head])
        return out

    want = _mean_ce(_hand_written(tiny_model, tiny_tokens, {hook: one_head}), counted)
    np.testing.assert_allclose(sums.scalars["ce_recon"] / sums.scalars["n_loss"], want, atol=1e-5)
    assert sums.d_in == d_head
