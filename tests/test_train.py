"""The TopK trainer and the activation buffer.

Dictionary recovery, AuxK on dead latents, unit-norm decoder, sparse backward =
dense autograd, grid = separate runs, SAELens round trip, and the buffer yielding
exactly the counted activations of the model at a hook.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sae_acceptance.sources.sae_io import load_sae, save_sae
from sae_acceptance.train.activations import ActivationBuffer, activation_batches_from_tensor
from sae_acceptance.train.optim import SignSGD, lr_factor
from sae_acceptance.train.settings import TrainSettings
from sae_acceptance.train.topk import (
    SCALE_TOKENS,
    TRAINER_VERSION,
    TopKTrainee,
    _initial_statistics,
    geometric_median,
    train_topk,
    train_topk_grid,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These SAEs are tiny: one thread is several times faster than two on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sparse_dictionary(atoms: int = 128, d: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(atoms, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def sparse_samples(dictionary: torch.Tensor, n: int, active: int = 4, seed: int = 1) -> torch.Tensor:
    """x = sum of `active` distinct atoms with coefficients in [0.5, 2.5]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, dictionary.shape[0], generator=g).argsort(1)[:, :active]
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    return (dictionary[idx] * coef[..., None]).sum(1)


def fvu(sae, x: torch.Tensor) -> float:
    recon = sae.reconstruct(x)[0]
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def alive_fraction(sae, x: torch.Tensor) -> float:
    return float((sae.encode(x).fired(sae.d_sae) > 0).float().mean())


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_recovers_a_known_sparse_dictionary(optimizer):
    """128 atoms in 32 dimensions, 4 active per sample: the SAE (256 latents, k=4) finds them.

    The dictionary has its own seed, so no decoder row starts at an atom.
    """
    dictionary = sparse_dictionary(seed=11)
    x = sparse_samples(dictionary, 480_000, seed=1)
    held_out = sparse_samples(dictionary, 5_000, seed=2)
    cfg = TrainSettings(
        k=4,
        d_sae=256,
        batch_size=512,
        warmup_steps=10,
        dead_tokens=20_000,
        seed=0,
        optimizer=optimizer,
    )
    sae = train_topk(activation_batches_from_tensor(x, 512, seed=3), 32, cfg, 480_000, progress=False)
    best = (dictionary @ sae.W_dec.T).max(dim=1).values  # each true atom's closest learned row
    # observed over dictionary seeds 11-13: adam 98-100% of atoms above 0.9 (96-98% without
    # the encoder scale), held-out FVU 0.133 (0.14), alive 0.51-0.53: about one latent per
    # atom; signum 100%, FVU 0.135-0.136, alive 0.56-0.57 (0-2% and FVU 0.17 when the
    # averaged decoder rows, of norm 0.55-0.58, were kept unnormalised)
    assert (best > 0.9).float().mean() >= 0.97, best.sort().values[:10]
    untrained = TopKTrainee(32, 4, cfg).to_sae({})
    assert fvu(untrained, held_out) > 0.5
    assert fvu(sae, held_out) < 0.2
    assert alive_fraction(sae, held_out) >= 0.45  # the 128 atoms need about 128 of the 256 latents
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256), rtol=0, atol=1e-5)
    assert sae.architecture == "topk" and sae.k == 4 and sae.dtype == torch.float32
    assert sae.metadata["training_tokens"] == 480_000
    assert sae.metadata["trainer_version"] == TRAINER_VERSION


def test_initial_encoder_scale_is_the_least_squares_fit_for_each_k():
    """At init the tied encoder is scaled, per k, so that the reconstruction is the
    least-squares multiple of the unscaled one on the scale sample: its error is
    orthogonal to it. Unscaled, the initial FVU grows with k (here 2.0 at k=8 and 49
    at k=96); scaled it is below 1 (0.24 and 0.11), and so is the first step's."""
    dictionary = sparse_dictionary(128, 32)
    x = sparse_samples(dictionary, 3 * SCALE_TOKENS, active=6, seed=1) + 0.5
    cfg = TrainSettings(d_sae=512, batch_size=SCALE_TOKENS, warmup_steps=10, seed=0)
    init = _initial_statistics(x, cfg)
    sample = x[:SCALE_TOKENS]  # the tokens the scale is fit on
    scales = {}
    for k in (8, 96):
        trainee = TopKTrainee(32, k, cfg)
        tied = trainee.W_dec.detach().clone()
        trainee.initialise(init)
        ratio = trainee.enc.detach() / tied
        scales[k] = float(ratio.mean())
        torch.testing.assert_close(ratio, torch.full_like(ratio, scales[k]))
        assert torch.equal(trainee.b_enc, torch.zeros(512))
        recon = trainee.to_sae({}).reconstruct(sample)[0]
        r, error = recon - init.b_dec, sample - recon
        # least squares: the error has no component along the reconstruction
        assert abs(float((error * r).sum())) < 1e-4 * float(r.pow(2).sum())
        assert fvu(trainee.to_sae({}), sample) < 0.95
        # the FVU the first training step reports (computed before its update)
        first = train_topk(
            activation_batches_from_tensor(x[SCALE_TOKENS:], SCALE_TOKENS, seed=0),
            32,
            cfg.model_copy(update={"k": k}),
            SCALE_TOKENS,
            progress=False,
        )
        assert first.metadata["final_train_fvu"] < 1.0
    assert scales[96] < 0.5 * scales[8]  # observed 0.12 and 0.39


def residual_explained_by_dead(sae, x: torch.Tensor, aux_k: int = 16) -> float:
    """1 - ||e - ê||² / ||e - mean e||², ê the AuxK reconstruction of the residual e by the
    top-`aux_k` pre-activations among the latents that never fire on `x`."""
    recon, code = sae.reconstruct(x)
    error = x - recon
    dead = (code.fired(sae.d_sae) == 0).nonzero().squeeze(1)
    pre = (x - sae.b_dec) @ sae.W_enc[:, dead] + sae.b_enc[dead]
    values, slots = pre.topk(min(aux_k, dead.numel()), dim=1)
    e_hat = F.embedding_bag(dead[slots], sae.W_dec, per_sample_weights=F.relu(values), mode="sum")
    return 1 - float((e_hat - error).pow(2).sum() / (error - error.mean(0)).pow(2).sum())


def test_auxk_trains_the_dead_latents_on_the_residual():
    """Data in an 8-dim subspace of 32: latents whose random rows point away from it never
    win the top-k. Without AuxK they get no gradient and sit at their init forever; with
    it every dead latent is trained to model the main reconstruction's error.

    Held-out alive fraction is not asserted: on this data (and on every toy set-up
    tried) AuxK lowers it (here 0.38-0.44 -> 0.32-0.37 over 4 seeds), because the dead latents
    are redundant and the AuxK gradient shrinks their pre-activations."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 8, generator=g))[0].T
    dictionary = F.normalize(torch.randn(64, 8, generator=g), dim=1) @ basis
    x = sparse_samples(dictionary, 100_000, active=2, seed=1)
    held_out = sparse_samples(dictionary, 8_000, active=2, seed=2)
    saes, unmoved = {}, {}
    for alpha in (0.0, 1 / 32):
        cfg = TrainSettings(
            k=2,
            d_sae=256,
            batch_size=512,
            warmup_steps=10,
            dead_tokens=5_000,
            auxk_alpha=alpha,
            seed=0,
        )
        saes[alpha] = train_topk(activation_batches_from_tensor(x, 512, 1), 32, cfg, 100_000, progress=False)
        init = TopKTrainee(32, 2, cfg).W_dec.detach()
        unmoved[alpha] = int(((saes[alpha].W_dec - init).norm(dim=1) == 0).sum())
        assert saes[alpha].metadata["final_dead_fraction"] > 0.3  # the set-up does make dead latents
    # observed over 4 seeds: 24..32 latents never leave their init without AuxK, none with it
    assert unmoved[0.0] >= 10
    assert unmoved[1 / 32] == 0
    # observed over 4 seeds: -8.5..-11.3 without AuxK (untrained rows overshoot), 0.01..0.20 with it
    assert residual_explained_by_dead(saes[0.0], held_out) < -2
    assert residual_explained_by_dead(saes[1 / 32], held_out) > -0.2
    # AuxK does not cost reconstruction
    assert fvu(saes[1 / 32], held_out) < fvu(saes[0.0], held_out) + 0.01


def test_sparse_backward_equals_dense_autograd():
    """The gathered encoder backward and embedding-bag decoder give the gradients of the plain
    dense formulation of the same loss (TopK + AuxK over the dead latents)."""
    d, m, k = 16, 64, 4
    cfg = TrainSettings(k=k, d_sae=m, auxk_k=8, dead_tokens=0, auxk_alpha=0.5, seed=0)
    trainee = TopKTrainee(d, k, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        trainee.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        trainee.b_enc.copy_(torch.randn(m, generator=g) * 0.3)
        trainee.enc.add_(0.1 * torch.randn(m, d, generator=g))
    trainee.variance = 3.0
    trainee.since_fired[32:] = 10  # latents 32.. are dead unless they fire now
    x = torch.randn(50, d, generator=g)
    loss, _ = trainee.step_loss(x)
    loss.backward()
    dead = trainee.dead_mask()
    assert 0 < int(dead.sum()) < 32

    p = {n: t.detach().clone().requires_grad_(True) for n, t in trainee.named_parameters()}
    pre = (x - p["b_dec"]) @ p["enc"].T + p["b_enc"]
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, F.relu(vals))
    error = x - (z @ p["W_dec"] + p["b_dec"])
    aux_vals, aux_idx = pre.masked_fill(~dead, -torch.inf).topk(8, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, F.relu(aux_vals))
    residual = error.detach()
    aux = (z_aux @ p["W_dec"] - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    (error.pow(2).sum() / (50 * 3.0) + 0.5 * aux).backward()
    for name, param in trainee.named_parameters():
        torch.testing.assert_close(param.grad, p[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_sign_descent_moves_every_weight_by_the_learning_rate():
    """One SignSGD step: -lr where the gradient is positive, +lr where negative, 0 where zero
    or absent."""
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    untouched = torch.nn.Parameter(torch.tensor([5.0]))
    optimiser = SignSGD([weight, untouched], lr=0.25)
    weight.grad = torch.tensor([0.5, -1e-9, 0.0, 7.0])
    optimiser.step()
    assert weight.detach().tolist() == [0.75, 2.25, 3.0, 3.75]
    assert untouched.item() == 5.0


def test_signum_saves_the_schedule_free_average_with_unit_decoder_rows(monkeypatch):
    """The saved SAE is the average x, rebuilt here from the training iterate y and the
    base sequence z (y = m x + (1 - m) z, m = 0.95), not y; its decoder rows are x's
    renormalised."""
    from schedulefree import ScheduleFreeWrapper

    seen = {}
    original = ScheduleFreeWrapper.eval

    def recording_eval(self):
        params = self.param_groups[0]["params"]
        seen["y"] = [p.detach().clone() for p in params]
        seen["z"] = [self.state[p]["z"].clone() for p in params]
        seen["momentum"] = self.momentum
        return original(self)

    monkeypatch.setattr(ScheduleFreeWrapper, "eval", recording_eval)
    dictionary = sparse_dictionary(64)
    x = sparse_samples(dictionary, 4_000, active=3, seed=4)
    cfg = TrainSettings(k=4, d_sae=64, batch_size=500, warmup_steps=0, seed=5, optimizer="signum")
    sae = train_topk(activation_batches_from_tensor(x, 500, 6), 32, cfg, 4_000, progress=False)

    m = seen["momentum"]
    assert m == 0.95
    w_dec, enc, b_enc, b_dec = ((y - (1 - m) * z) / m for y, z in zip(seen["y"], seen["z"], strict=True))
    torch.testing.assert_close(sae.W_enc, enc.T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.b_enc, b_enc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.b_dec, b_dec, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.W_dec, F.normalize(w_dec, dim=1), rtol=1e-4, atol=1e-6)
    assert (seen["y"][1] - enc).abs().max() > 1e-3  # the iterate is not the average
    assert w_dec.norm(dim=1).max() < 0.999  # the average's rows were shorter than unit


# --------------------------------------------------------------------------- grid, format


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_grid_equals_separate_runs_and_loads_in_saelens(tmp_path, optimizer):
    dictionary = sparse_dictionary(64)
    x = sparse_samples(dictionary, 7_000, active=3, seed=4)
    cfg = TrainSettings(
        k=8,
        d_sae=64,
        batch_size=500,
        warmup_steps=2,
        dead_tokens=1_000,
        seed=5,
        optimizer=optimizer,
    )
    total = 6_250  # not a whole number of batches: the last one is cut
    ks = [2, 5, 8]
    grid = train_topk_grid(
        activation_batches_from_tensor(x, 500, 6),
        32,
        ks,
        cfg,
        total,
        progress=False,
        hook_name="blocks.0.hook_resid_post",
        model_name="synthetic",
    )
    assert sorted(grid) == ks
    for k in ks:
        alone = train_topk(
            activation_batches_from_tensor(x, 500, 6),
            32,
            cfg.model_copy(update={"k": k}),
            total,
            progress=False,
        )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(grid[k], name), getattr(alone, name), rtol=1e-5, atol=1e-6)
        assert grid[k].k == k and grid[k].metadata["k"] == k
        assert grid[k].metadata["training_tokens"] == total and grid[k].metadata["seed"] == 5
    assert not torch.equal(grid[2].W_dec, grid[8].W_dec)

    sae = grid[8]
    assert sae.hook_name == "blocks.0.hook_resid_post"
    save_sae(sae, tmp_path / "sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sae_lens imports transformer_lens.utils, deprecated
        from sae_lens import SAE as SAELensSAE

        theirs = SAELensSAE.load_from_disk(str(tmp_path / "sae"))
    ours = load_sae(tmp_path / "sae")
    assert ours.metadata["trainer_version"] == TRAINER_VERSION and ours.k == 8
    probe = x[:256] + 0.3 * torch.randn(256, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(probe), ours.reconstruct(probe)[0], rtol=1e-5, atol=1e-5)


def test_schedule_and_geometric_median():
    cfg = TrainSettings(warmup_steps=10, decay_fraction=0.2)
    total = 1000
    assert lr_factor(0, 0, total, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 90, total, cfg) == 1.0
    assert lr_factor(50, 799, total, cfg) == 1.0
    assert lr_factor(90, 900, total, cfg) == pytest.approx(0.5)
    assert lr_factor(99, 999, total, cfg) == pytest.approx(0.005)
    assert TrainSettings(d_sae=2**12).learning_rate(64) == pytest.approx(4e-4)
    assert TrainSettings(d_sae=2**12, optimizer="signum").learning_rate(64) == pytest.approx(1e-2)
    assert TrainSettings().decay() == 0.2 and TrainSettings(optimizer="signum").decay() == 0.0
    assert TrainSettings(optimizer="signum", decay_fraction=0.1).decay() == 0.1
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=0)
    with pytest.raises(ValueError, match="optimizer\n.*'adam' or 'signum'"):
        TrainSettings(optimizer="sgd")

    g = torch.Generator().manual_seed(0)
    points = torch.randn(900, 8, generator=g)
    outliers = torch.full((100, 8), 50.0)
    median = geometric_median(torch.cat([points, outliers]))
    assert median.norm() < 1.0 < torch.cat([points, outliers]).mean(0).norm()


# --------------------------------------------------------------------------- activations


@pytest.fixture(scope="module")
def tiny_hooked():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(
            n_layers=2,
            d_model=16,
            n_ctx=16,
            d_head=4,
            n_heads=4,
            d_vocab=50,
            act_fn="gelu",
            normalization_type="LN",
            seed=0,
        )
        return HookedTransformer(cfg).eval()


def assert_same_multiset(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Rows of `got` are those of `want` up to order, with multiplicity (equal up to `tol`;
    duplicates happen: the same token at position 0 has the same activation)."""
    assert got.shape == want.shape
    got_want = torch.cdist(got.double(), want.double()) < tol
    want_want = torch.cdist(want.double(), want.double()) < tol
    assert got_want.any(1).all(), "a yielded activation is not among the counted ones"
    assert torch.equal(got_want.sum(0), want_want.sum(0)), "multiplicities differ"


def test_activation_buffer_yields_exactly_the_counted_activations(tiny_hooked):
    hook = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 50, (12, 16), generator=torch.Generator().manual_seed(0))
    counted = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    with torch.no_grad():
        _, cache = tiny_hooked.run_with_cache(tokens, names_filter=hook)
    reference = cache[hook][counted]  # row-major: sequence by sequence
    n = reference.shape[0]

    buffer = ActivationBuffer(
        tiny_hooked,
        tokens,
        hook,
        batch_size=32,
        buffer_tokens=64,
        seed=0,
        counted=counted,
        model_batch=5,
    )
    batches = list(buffer)
    sizes = [b.shape[0] for b in batches]
    assert sum(sizes) == n and all(s == 32 for s in sizes[:-1]) and len(batches) == len(buffer)
    got = torch.cat(batches)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert_same_multiset(got, reference)
    assert not torch.allclose(got, reference)  # shuffled
    again = torch.cat(list(buffer))
    assert torch.equal(got, again)  # the same seed, the same batches
    other = torch.cat(list(ActivationBuffer(tiny_hooked, tokens, hook, 32, 64, seed=1, counted=counted, model_batch=5)))
    assert not torch.equal(got, other)

    # more tokens than there are: cycles from the first sequence; fewer: the first ones
    for total in (n + 37, 50):
        cycled = torch.cat(
            list(
                ActivationBuffer(
                    tiny_hooked,
                    tokens,
                    hook,
                    batch_size=32,
                    buffer_tokens=64,
                    seed=0,
                    counted=counted,
                    total_tokens=total,
                    model_batch=5,
                )
            )
        )
        assert cycled.shape[0] == total
        want = torch.cat([reference, reference])[:total]
        assert_same_multiset(cycled, want)


def test_activation_buffer_stops_at_the_hook_layer_and_feeds_the_trainer(tiny_hooked):
    hook = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(2))
    buffer = ActivationBuffer(tiny_hooked, tokens, hook, batch_size=40, buffer_tokens=80, seed=0, model_batch=4)
    assert buffer.stop_at_layer == 1
    ran = []
    handle = tiny_hooked.blocks[1].register_forward_hook(lambda *args: ran.append(1))
    try:
        sae = train_topk(
            buffer,
            16,
            TrainSettings(k=2, d_sae=32, batch_size=40, warmup_steps=1, seed=0),
            total_tokens=128,
            progress=False,
            hook_name=hook,
            model_name="tiny",
        )
    finally:
        handle.remove()
    assert not ran  # block 1 never ran
    assert sae.hook_name == hook and sae.model_name == "tiny"
    assert sae.metadata["training_tokens"] == 128
    with pytest.raises(ValueError, match="no hook"):
        ActivationBuffer(tiny_hooked, tokens, "blocks.7.hook_resid_post", 32, seed=0)
    with pytest.raises(ValueError, match="no counted"):
        ActivationBuffer(tiny_hooked, tokens, hook, 32, seed=0, counted=torch.zeros_like(tokens, dtype=torch.bool))
