"""A SAELens config that leaves a key out means what SAELens makes of it.

For each key SAELens's config classes default, an SAE is written in SAELens's layout,
the key is deleted from its cfg.json, and the project's loader and SAELens's own
(`SAE.load_from_disk`, or `SAE.from_pretrained` where only a release path reads it)
must give the same tensors, latents and outputs.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from test_sae_converters import hub  # noqa: F401  (the offline hub cache fixture)

from sae_acceptance.sources.formats.saelens import SAELENS_DEFAULTS
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import load_sae, save_sae

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.standard_sae import StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAEConfig  # noqa: E402

D, F = 16, 128  # d_sae above SAELens's default k = 100


def rand(*shape: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def make_sae(architecture: str) -> SAE:
    """An SAE whose b_dec matters: subtracting it from the input changes the latents."""
    extra = {
        "topk": {"k": 7},
        "jumprelu": {"threshold": rand(F, seed=5).abs()},
        "gated": {"b_mag": rand(F, seed=6, scale=0.1), "r_mag": rand(F, seed=7)},
    }.get(architecture, {})
    w_dec = rand(F, D, seed=3)
    w_dec = w_dec * (1 + torch.arange(F)[:, None] / F)  # decoder rows of unequal norm: rescaling would show
    return SAE(
        rand(D, F, seed=1),
        rand(F, seed=2, scale=0.1),
        w_dec,
        rand(D, seed=4, scale=1.0),
        architecture=architecture,
        apply_b_dec_to_input=False,
        hook_name="blocks.1.hook_resid_post",
        **extra,
    )


def without(path: Path, key: str, legacy: bool = False) -> Path:
    """`path`'s cfg.json without `key` (and, `legacy`, in the flat pre-6.0 layout)."""
    file = path / "cfg.json"
    cfg = json.loads(file.read_text())
    if legacy:
        meta = cfg.pop("metadata")
        meta.pop("sae_lens_version"), meta.pop("sae_lens_training_version")
        cfg |= {**meta, "hook_point": meta.pop("hook_name")}
    del cfg[key]
    file.write_text(json.dumps(cfg))
    return path


def assert_same(ours: SAE, theirs) -> None:
    assert ours.dtype == theirs.dtype
    x = rand(200, D, seed=9, scale=2.0).to(ours.dtype)
    with torch.no_grad():
        their_latents, their_out = theirs.encode(x), theirs(x)
    out, code = ours.reconstruct(x)
    latents = code.dense(ours.d_sae)
    assert bool((latents != 0).any()) and bool((latents == 0).any())
    torch.testing.assert_close(latents, their_latents, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, their_out, rtol=1e-6, atol=1e-5)


def test_the_defaults_are_saelens_own():
    defaults = {f.name: f.default for config in (StandardSAEConfig, TopKSAEConfig) for f in dataclasses.fields(config)}
    assert {key: defaults[key] for key in SAELENS_DEFAULTS} == SAELENS_DEFAULTS


@pytest.mark.parametrize(
    ("architecture", "key", "legacy"),
    [
        ("standard", "apply_b_dec_to_input", False),
        ("topk", "apply_b_dec_to_input", False),
        ("jumprelu", "apply_b_dec_to_input", False),
        ("gated", "apply_b_dec_to_input", False),
        ("standard", "apply_b_dec_to_input", True),
        ("standard", "normalize_activations", False),
        ("topk", "k", False),
        ("topk", "rescale_acts_by_decoder_norm", False),
    ],
)
def test_a_missing_key_reads_as_saelens_reads_it(tmp_path, architecture, key, legacy):
    path = without(save_sae(make_sae(architecture), tmp_path / "sae"), key, legacy)
    ours = load_sae(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.load_from_disk(path)
    if key == "apply_b_dec_to_input":
        assert ours.apply_b_dec_to_input is theirs.cfg.apply_b_dec_to_input is True
    if key == "k":
        assert ours.k == theirs.cfg.k == 100
    params = dict(theirs.named_parameters())
    for name, tensor in ours.tensors().items():
        assert torch.equal(tensor, params["b_gate" if name == "b_enc" and architecture == "gated" else name]), name
    assert_same(ours, theirs)


def test_a_missing_dtype_is_float32_as_saelens_reads_it(hub):  # noqa: F811
    """SAELens reads a cfg.json without `dtype` only through a release (`from_pretrained` names one;
    `load_from_disk` needs the key); a directory without it is float32 here, SAELens's default."""
    sae = make_sae("jumprelu").to(dtype=torch.bfloat16)
    folder = hub("acme/saes", "jumprelu/cfg.json").parent
    without(save_sae(sae, folder), "dtype")
    release = hub.release("sae_lens", "acme/saes", "jumprelu")
    ours = load_sae(f"sae-lens://{release}/sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.from_pretrained(release, "sae")
    assert ours.dtype == load_sae(folder).dtype == torch.float32
    assert_same(ours, theirs)
