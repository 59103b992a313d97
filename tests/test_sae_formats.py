"""SAE directories on disk: every layout the loader reads gives the outputs of the tool that wrote it.

SAELens layouts (v6 `standard`/`topk`/`jumprelu`, and a pre-6.0 flat config with
`activation_fn: topk`) are checked against SAELens' own `SAE.load_from_disk` on the
same directory; the sparsify layout against its forward written out by hand. Bad
directories give one error that names the file and what is wrong; nothing is unpickled.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import load_sae, save_sae

D_IN, D_SAE, K = 16, 64, 5
HOOK = "blocks.1.hook_resid_post"


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.4,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.4,
        "b_dec": torch.randn(D_IN, generator=g) * 0.1,
    }


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(200, D_IN, generator=torch.Generator().manual_seed(seed))


def saelens_reconstruction(path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from sae_lens import SAE as SAELensSAE

    theirs = SAELensSAE.load_from_disk(str(path))
    with torch.no_grad():
        latents = theirs.encode(x)
        return theirs.decode(latents), latents


def ours(path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sae = load_sae(path)
    recon, code = sae.reconstruct(x)
    return recon, code.dense(sae.d_sae)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_v6_directories_agree_with_saelens(tmp_path, architecture):
    weights = random_weights()
    extra = {"threshold": torch.rand(D_SAE) * 0.3} if architecture == "jumprelu" else {}
    sae = SAE(
        **weights,
        **extra,
        architecture=architecture,
        k=K if architecture == "topk" else None,
        hook_name=HOOK,
        model_name="m",
    )
    save_sae(sae, tmp_path / "sae")
    x = inputs()
    recon, latents = ours(tmp_path / "sae", x)
    their_recon, their_latents = saelens_reconstruction(tmp_path / "sae", x)
    torch.testing.assert_close(latents, their_latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recon, their_recon, rtol=1e-5, atol=1e-5)
    loaded = load_sae(tmp_path / "sae")
    assert (loaded.architecture, loaded.hook_name, loaded.model_name) == (architecture, HOOK, "m")
    if architecture == "jumprelu":  # the threshold really gates: some positive pre-activations are cut
        pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
        assert bool(((pre > 0) & (latents == 0)).any())


def test_pre_6_flat_topk_config_agrees_with_saelens(tmp_path):
    """Released SAEs before SAELens 6 carry a flat config: `activation_fn: topk` with its k."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file(random_weights(2), str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "pythia-70m",
        "hook_name": HOOK,
        "hook_layer": 1,
        "hook_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "dataset_path": "x",
        "prepend_bos": False,
        "normalize_activations": "none",
        "architecture": "standard",
        "sae_lens_training_version": "5.9.0",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(folder)
    assert (loaded.architecture, loaded.k, loaded.hook_name, loaded.model_name) == ("topk", K, HOOK, "pythia-70m")
    x = inputs(3)
    recon, latents = ours(folder, x)
    assert ((latents != 0).sum(-1) <= K).all()
    their_recon, their_latents = saelens_reconstruction(folder, x)
    torch.testing.assert_close(latents, their_latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recon, their_recon, rtol=1e-5, atol=1e-5)


def test_sparsify_directory_gives_sparsifys_forward(tmp_path):
    """sparsify: `encoder` as a Linear ([M, d] weight), ReLU, then top-k; decode with W_dec + b_dec."""
    w = random_weights(4)
    folder = tmp_path / "layers.1"
    folder.mkdir()
    save_file(
        {
            "encoder.weight": w["W_enc"].T.contiguous(),
            "encoder.bias": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        },
        str(folder / "sae.safetensors"),
    )
    (folder / "cfg.json").write_text(
        json.dumps({"num_latents": D_SAE, "k": K, "d_in": D_IN, "normalize_decoder": True})
    )
    x = inputs(5)
    pre = F.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # sparsify: ReLU first, then top-k
    values, indices = pre.topk(K, dim=-1)
    expected = (values.unsqueeze(-1) * w["W_dec"][indices]).sum(1) + w["b_dec"]
    recon, latents = ours(folder, x)
    torch.testing.assert_close(recon, expected, rtol=1e-5, atol=1e-5)
    assert load_sae(folder).architecture == "topk"


def write_saelens(folder, tensors: dict[str, torch.Tensor] | None = None, **cfg_changes):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors or random_weights(), str(folder / "sae_weights.safetensors"))
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": HOOK},
    }
    cfg.update(cfg_changes)
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def test_bad_directories_are_one_clear_error(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "cfg.json").write_text("{}")
    torch.save(random_weights(), pickled / "sae_weights.pt")  # a pickle: never opened
    with pytest.raises(
        SAEFormatError,
        match=r"pickled: no SAE weights; expected one of: cfg\.json \+ sae_weights\.safetensors \(SAELens\)",
    ):
        load_sae(pickled)
    missing = random_weights()
    del missing["b_enc"]
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: missing tensor\(s\) b_enc"):
        load_sae(write_saelens(tmp_path / "missing", missing))
    wrong = {**random_weights(), "W_dec": torch.zeros(D_SAE, D_IN + 1)}
    with pytest.raises(SAEFormatError, match=r"wrong: tensor W_dec has shape \(64, 17\), expected \(64, 16\)"):
        load_sae(write_saelens(tmp_path / "wrong", wrong))
    with pytest.raises(
        SAEFormatError, match="normalize_activations='expected_average_only_in' needs the activation scaling factor"
    ):
        load_sae(write_saelens(tmp_path / "norm", normalize_activations="expected_average_only_in"))
    with pytest.raises(SAEFormatError, match="normalize_activations='covariance_whitening' is not supported"):
        load_sae(write_saelens(tmp_path / "whiten", normalize_activations="covariance_whitening"))
    with pytest.raises(
        SAEFormatError, match="architecture .temporal. is not supported \\(its latents depend on earlier tokens"
    ):
        load_sae(write_saelens(tmp_path / "temporal", architecture="temporal"))
    with pytest.raises(
        SAEFormatError, match=r"gated/sae_weights\.safetensors: missing tensor\(s\) b_gate, b_mag, r_mag"
    ):
        load_sae(write_saelens(tmp_path / "gated", architecture="gated"))
    with pytest.raises(SAEFormatError, match="topk config without k, and SAELens's default k = 100 is above d_sae"):
        load_sae(write_saelens(tmp_path / "nok", architecture="topk"))
    broken = write_saelens(tmp_path / "json")
    (broken / "cfg.json").write_text('{\n  "d_in": 16,\n  oops\n}')
    with pytest.raises(SAEFormatError, match=r"cfg\.json:3: not valid JSON"):
        load_sae(broken)
    (tmp_path / "file").write_text("")
    with pytest.raises(SAEFormatError, match="expected a directory holding one of"):
        load_sae(tmp_path / "file")


def test_malformed_configs_and_tensors_are_one_clear_error(tmp_path):
    with pytest.raises(SAEFormatError, match="k must be a whole number, got 'eight'"):
        load_sae(write_saelens(tmp_path / "k", architecture="topk", k="eight"))
    flat = write_saelens(tmp_path / "list")
    (flat / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SAEFormatError, match=r"cfg\.json: expected a JSON object, got list"):
        load_sae(flat)
    latin = write_saelens(tmp_path / "latin")
    (latin / "cfg.json").write_bytes('{"d_in": "é"}'.encode("latin-1"))
    with pytest.raises(SAEFormatError, match=r"cfg\.json: not UTF-8 text"):
        load_sae(latin)
    one_d = {**random_weights(), "W_enc": torch.zeros(D_IN)}
    with pytest.raises(SAEFormatError, match=r"tensor W_enc has shape \(16,\), expected 2 dimensions"):
        load_sae(write_saelens(tmp_path / "flat_enc", one_d))
    threshold = {**random_weights(), "threshold": torch.zeros(D_SAE + 1)}
    with pytest.raises(SAEFormatError, match=r"tensor threshold has shape \(65,\), expected \(64,\)"):
        load_sae(write_saelens(tmp_path / "thr", threshold, architecture="jumprelu"))
