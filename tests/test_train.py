"""The TopK trainer: dictionary recovery, AuxK revival, unit-norm decoder, grid = separate runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import D_MODEL

from sae_acceptance.sources.sae import load_sae, save_sae
from sae_acceptance.train.activations import ActivationBuffer, activation_batches_from_tensor
from sae_acceptance.train.topk import TrainConfig, train_topk, train_topk_grid


def sparse_dictionary_data(n: int, d: int = 32, atoms: int = 64, active: int = 3, seed: int = 0):
    """x = Σ of `active` random nonnegative multiples of unit-norm true atoms."""
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(atoms, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    return (dictionary[idx] * coef[..., None]).sum(1), dictionary


def fvu(sae, x):
    recon = sae.reconstruct(x)[0]
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_recovers_a_known_sparse_dictionary():
    x, dictionary = sparse_dictionary_data(60_000)
    cfg = TrainConfig(k=4, d_sae=128, batch_size=512, lr=3e-3, warmup_steps=10, dead_tokens=5_000, seed=0)
    sae = train_topk(activation_batches_from_tensor(x, 512, seed=1), 32, cfg, total_tokens=60_000, progress=False)
    best = (dictionary @ sae.W_dec.T).max(dim=1).values  # each true atom's closest learned row
    assert (best > 0.9).float().mean() > 0.8, best
    held_out, _ = sparse_dictionary_data(4_000, seed=0)
    assert fvu(sae, held_out) < 0.1
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_auxk_trains_the_dead_latents_and_only_with_it_on():
    """In a 4-dim subspace with k=2 most latents never win the top-k: without AuxK their
    decoder rows never move; with AuxK they are trained on the residual error."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T
    x = torch.randn(20_000, 4, generator=g) @ basis
    rows = {}
    for alpha in (0.0, 1 / 32):
        cfg = TrainConfig(k=2, d_sae=256, batch_size=500, lr=2e-3, warmup_steps=5, dead_tokens=2_000,
                          auxk_alpha=alpha, auxk_k=16, seed=0)
        rows[alpha] = train_topk(activation_batches_from_tensor(x, 500, 1), 32, cfg, 20_000, progress=False).W_dec
    init = F.normalize(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    never_moved = (rows[0.0] - init).norm(dim=1) < 1e-6
    assert never_moved.float().mean() > 0.3  # plenty of dead latents without AuxK
    moved_with_aux = (rows[1 / 32] - init).norm(dim=1) > 1e-3
    assert moved_with_aux[never_moved].float().mean() > 0.5


def test_grid_equals_separate_runs_and_loads_in_saelens(tmp_path):
    x, _ = sparse_dictionary_data(6_000, seed=4)
    cfg = TrainConfig(k=8, d_sae=64, batch_size=500, lr=1e-3, warmup_steps=2, dead_tokens=1_000, seed=5)
    grid = train_topk_grid(activation_batches_from_tensor(x, 500, 6), 32, [2, 8], cfg, 6_000, progress=False)
    for k in (2, 8):
        alone = train_topk(activation_batches_from_tensor(x, 500, 6), 32, TrainConfig(**{**cfg.__dict__, "k": k}),
                           6_000, progress=False)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(grid[k], name), getattr(alone, name), rtol=1e-5, atol=1e-6)

    from sae_lens import SAE as SAELensSAE

    sae = grid[8]
    sae.hook_name, sae.model_name = "blocks.0.hook_resid_post", "synthetic"
    save_sae(sae, tmp_path / "sae")
    theirs = SAELensSAE.load_from_disk(str(tmp_path / "sae"))
    ours = load_sae(tmp_path / "sae")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x[:256]), ours.reconstruct(x[:256])[0], rtol=1e-5, atol=1e-5)


def test_activation_buffer_yields_the_counted_activations(tiny_model, tiny_tokens):
    hook = "blocks.1.hook_resid_post"
    counted = torch.rand(tiny_tokens.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    buffer = ActivationBuffer(tiny_model, tiny_tokens, hook, batch_size=50, buffer_tokens=100, seed=0,
                              counted=counted, model_batch=5)
    got = torch.cat(list(buffer))
    _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter=hook)
    want = cache[hook][counted]
    assert got.shape == want.shape == (int(counted.sum()), D_MODEL)
    torch.testing.assert_close(got.sum(0).double(), want.sum(0).double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[:, 0].sort().values, want[:, 0].sort().values)
    assert not torch.equal(got, want)  # shuffled
