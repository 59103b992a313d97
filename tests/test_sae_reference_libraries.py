"""Local directories against the libraries that wrote them: eai-sparsify and dictionary_learning.

sparsify: `SparseCoder.load_from_disk` and its forward on the same directory,
for TopK, GroupMax, a transcoder and a skip connection. dictionary_learning:
each dictionary class's own `encode`/`decode` on the same `ae.pt`. Its package
`__init__` imports nnsight (not installed here), so its `dictionary.py` and
trainer modules are imported without running that `__init__`. `hf://` folders in
each layout load like the local directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_acceptance.sources.sae_io import load_sae

D, F, K = 16, 64, 8
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def inputs(seed: int = 1, d: int = D) -> torch.Tensor:
    return torch.randn(200, d, generator=torch.Generator().manual_seed(seed)) * 2


# --------------------------------------------------------------------------- sparsify


def sparsify_coder(tmp_path: Path, seed: int, **cfg):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(seed)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=F, k=K, **cfg))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    folder = tmp_path / f"layers.{seed}"
    coder.save_to_disk(folder)
    return coder, folder


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"activation": "groupmax"},
        {"transcode": True},
        {"skip_connection": True},
        {"transcode": True, "skip_connection": True},
    ],
    ids=["topk", "groupmax", "transcode", "skip", "transcode-skip"],
)
def test_sparsify_directories_give_sparse_coders_forward(tmp_path, cfg):
    """The loader before these formats read every one of these as a plain TopK SAE that subtracts b_dec."""
    coder, folder = sparsify_coder(tmp_path, 3, **cfg)
    x = inputs()
    with torch.no_grad():
        theirs = coder(x)
    sae = load_sae(folder)
    out, code = sae.reconstruct(x)
    torch.testing.assert_close(out, theirs.sae_out, rtol=1e-6, atol=1e-5)
    dense = code.dense(F)
    expected = torch.zeros_like(dense).scatter_(-1, theirs.latent_indices, theirs.latent_acts)
    torch.testing.assert_close(dense, expected, rtol=1e-6, atol=1e-6)
    assert sae.transcoder == bool(cfg.get("transcode")) and sae.apply_b_dec_to_input != bool(cfg.get("transcode"))
    assert sae.architecture == cfg.get("activation", "topk")


# --------------------------------------------------------------------------- dictionary_learning


@pytest.fixture(scope="module")
def dl():
    """dictionary_learning's modules, imported without its package __init__ (which needs nnsight)."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or spec.origin is None:
        pytest.skip("dictionary-learning is not installed")
    root = Path(spec.origin).parent
    saved = {n: sys.modules.get(n) for n in ("dictionary_learning", "dictionary_learning.trainers")}
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    mods = {
        n: importlib.import_module(f"dictionary_learning.{n}")
        for n in ("dictionary", "trainers.top_k", "trainers.batch_top_k", "trainers.matryoshka_batch_top_k")
    }
    yield types.SimpleNamespace(
        AutoEncoder=mods["dictionary"].AutoEncoder,
        GatedAutoEncoder=mods["dictionary"].GatedAutoEncoder,
        JumpReluAutoEncoder=mods["dictionary"].JumpReluAutoEncoder,
        AutoEncoderTopK=mods["trainers.top_k"].AutoEncoderTopK,
        BatchTopKSAE=mods["trainers.batch_top_k"].BatchTopKSAE,
        MatryoshkaBatchTopKSAE=mods["trainers.matryoshka_batch_top_k"].MatryoshkaBatchTopKSAE,
    )
    for name in [n for n in sys.modules if n.startswith("dictionary_learning")]:
        del sys.modules[name]
    sys.modules.update({n: m for n, m in saved.items() if m is not None})


def build(dl, dict_class: str, seed: int = 0):
    cls = getattr(dl, dict_class)
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        ae = cls(D, F, K)
    elif dict_class == "MatryoshkaBatchTopKSAE":
        ae = cls(D, F, K, [16, 48])
    else:
        ae = cls(D, F)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "bias" in name or "b_" in name else 0.3))
        if hasattr(ae, "threshold"):
            ae.threshold.copy_(torch.rand(ae.threshold.shape, generator=g) * 0.5 + 0.1)
    return ae


DL_CLASSES = {
    "AutoEncoder": "standard",
    "GatedAutoEncoder": "gated",
    "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "jumprelu",  # at inference: its threshold for every latent
    "MatryoshkaBatchTopKSAE": "jumprelu",
}


def write_dl(folder: Path, ae, dict_class: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ae.state_dict(), folder / "ae.pt")
    trainer = {
        "dict_class": dict_class,
        "activation_dim": D,
        "dict_size": F,
        "k": K,
        "layer": 3,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "submodule_name": "resid_post_layer_3",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return folder


@pytest.mark.parametrize("dict_class", DL_CLASSES)
def test_dictionary_learning_directories_give_its_forward(dl, tmp_path, dict_class):
    ae = build(dl, dict_class)
    folder = write_dl(tmp_path / dict_class, ae, dict_class)
    x = inputs(2)
    with torch.no_grad():
        features = ae.encode(x)
        recon = ae.decode(features)
    sae = load_sae(folder)
    out, code = sae.reconstruct(x)
    assert (sae.architecture, sae.hook_name, sae.model_name) == (
        DL_CLASSES[dict_class],
        "blocks.3.hook_resid_post",
        "pythia-70m-deduped",
    )
    dense = code.dense(F)
    assert bool((dense != 0).any()) and bool((dense == 0).any())
    torch.testing.assert_close(dense, features, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, recon, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- hf:// layouts


@pytest.fixture
def hub_root(tmp_path, monkeypatch):
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))

    def snapshot(repo_id: str) -> Path:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        return repo / "snapshots" / COMMIT

    return snapshot


def test_hf_folders_in_every_layout(dl, tmp_path, hub_root):
    """sparsify, dictionary_learning and Gemma Scope folders on the hub load like their local copies."""
    snap = hub_root("acme/saes")
    _, sparse = sparsify_coder(tmp_path, 4, transcode=True)
    snap.mkdir(parents=True)
    sparse.rename(snap / "layers.4")
    write_dl(snap / "dl" / "trainer_0", build(dl, "GatedAutoEncoder"), "GatedAutoEncoder")
    gemma = hub_root("google/gemma-scope-2b-pt-res") / "layer_5" / "width_16k" / "average_l0_9"
    gemma.mkdir(parents=True)
    g = np.random.default_rng(0)
    np.savez(
        gemma / "params.npz",
        w_enc=g.normal(size=(D, F)).astype(np.float32),
        w_dec=g.normal(size=(F, D)).astype(np.float32),
        b_enc=np.zeros(F, np.float32),
        b_dec=np.zeros(D, np.float32),
        threshold=np.full(F, 0.5, np.float32),
    )
    x = inputs(5)
    for spec, local, arch, hook in (
        ("hf://acme/saes/layers.4", snap / "layers.4", "topk", None),
        ("hf://acme/saes/dl/trainer_0", snap / "dl" / "trainer_0", "gated", "blocks.3.hook_resid_post"),
        (
            "hf://google/gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_9",
            gemma,
            "jumprelu",
            "blocks.5.hook_resid_post",
        ),
    ):
        remote = load_sae(spec)
        assert (remote.architecture, remote.hook_name) == (arch, hook)
        torch.testing.assert_close(remote.reconstruct(x)[0], load_sae(local).reconstruct(x)[0])
