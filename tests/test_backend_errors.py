"""Loading a model: every way it can go wrong is one line naming what and where; a checkpoint
without tokenizer files evaluates end to end."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import VOCAB, random_topk_sae
from test_backends import TL_KIND, build_llama_checkpoint

from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import SourceError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.reference.language import TopicLanguage
from sae_acceptance.sources.model import load_backend
from sae_acceptance.sources.sae_io import save_sae


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and len(text) < 400, text
    return text


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama_checkpoint(tmp_path_factory.mktemp("gqa") / "checkpoint")


@pytest.mark.parametrize("name", ["/no/such/dir/ckpt", "./missing-model", "~/nowhere/model", "runs/a/b"])
def test_a_missing_local_path_names_the_path_and_nothing_else(name):
    with pytest.raises(SourceError) as excinfo:
        load_backend(name, device="cpu")
    assert _one_line(excinfo) == f"model {name!r}: no such directory"


def test_an_unknown_name_suggests_at_most_three_transformer_lens_names():
    with pytest.raises(SourceError) as excinfo:
        load_backend("pythia-70mm", device="cpu")
    text = _one_line(excinfo)
    assert text.startswith("model 'pythia-70mm': no such local directory, and not a model name TransformerLens knows")
    closest = text.split("(closest: ", 1)[1].split(")", 1)[0].split(", ")
    assert "pythia-70m" in closest and len(closest) <= 3
    assert "Hugging Face:" in text  # auto tried it too (offline here)


def test_a_file_or_a_directory_without_config_is_one_line(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(SourceError) as excinfo:
        load_backend(tmp_path / "weights.bin", device="cpu")
    assert "a file, expected a checkpoint directory" in _one_line(excinfo)
    with pytest.raises(SourceError) as excinfo:
        load_backend(tmp_path, device="cpu", backend="hf")
    assert "not a Hugging Face checkpoint directory (no config.json)" in _one_line(excinfo)


def test_backend_choice_and_processing_are_checked(llama):
    with pytest.raises(SourceError) as excinfo:
        load_backend(llama, device="cpu", backend="vllm")
    assert _one_line(excinfo) == "backend 'vllm' is not one of auto, transformer_lens, hf"
    with pytest.raises(SourceError) as excinfo:
        load_backend(llama, device="cpu", backend="hf", from_pretrained_kwargs={"fold_ln": True})
    assert "trained on a TransformerLens-processed model (fold_ln=True)" in _one_line(excinfo)
    with pytest.raises(SourceError) as excinfo:
        load_backend(llama, device="cpu", devices=2)
    assert "needs CUDA devices" in _one_line(excinfo)


def test_hooks_that_do_not_exist_are_one_line(llama):
    hf = load_backend(llama, device="cpu", backend="hf")
    cases = {
        "model.layers.1.mpl": "has no module 'model.layers.1.mpl'",
        "blocks.1.hook_q": "has no module path on LlamaForCausalLM",
        "model.norm": "is outside the decoder layers",
    }
    for hook, expected in cases.items():
        with pytest.raises(SourceError) as excinfo:
            hf.hook_width(hook)
        assert expected in _one_line(excinfo)
    tl = load_backend(llama, device="cpu", backend="transformer_lens")
    with pytest.raises(SourceError) as excinfo:
        tl.hook_width("blocks.1.hook_resid_pots")
    assert "closest valid hooks: blocks.1.hook_resid_post" in _one_line(excinfo)


# text data without a tokenizer: tests/test_tokens.py (its one line is the token source's)


@pytest.mark.parametrize("backend", ["auto", "hf"])
def test_a_checkpoint_without_tokenizer_evaluates(tmp_path, llama, backend):
    np.save(tmp_path / "tokens.npy", TopicLanguage(VOCAB, n_topics=4, seed=0).sequences(16, 16, seed=5))
    save_sae(random_topk_sae(k=8, hook="blocks.1.hook_resid_post"), tmp_path / "sae")
    save_sae(random_topk_sae(k=8, seed=3), tmp_path / "sae-hf")
    (tmp_path / "thresholds.toml").write_text(
        f'[eval]\nmodel = "{llama}"\ndata = "tokens.npy"\nn_sequences = 16\ncontext_size = 16\n'
        f'batch_size = 8\ndevice = "cpu"\nbackend = "{backend}"\nbootstrap_resamples = 100\n'
        '[[sae]]\nname = "resid"\npath = "sae"\n'
        '[[sae]]\nname = "by-path"\npath = "sae-hf"\nhook = "model.layers.1.mlp"\n'
    )
    report = evaluate(load_thresholds(tmp_path / "thresholds.toml"), progress=False)
    for name in ("resid", "by-path"):
        result = report.saes[name]
        assert result.error is None, result.error
        assert np.isfinite(result.metrics["ce_rec"].value) and result.layer == 1
        assert result.excluded_ids == [0, 1, 2]  # the config's BOS/EOS/PAD ids
    model = report.settings["models"][str(llama)]
    assert model["backend"] == ("hf" if backend == "hf" else TL_KIND)
    assert model["patched_passes"] == "tail from the hook"  # TransformerLens 4's bridge included


@pytest.mark.skipif(TL_KIND != "transformer_lens", reason="TransformerLens 3's hub loader")
def test_a_name_transformer_lens_loads_with_repository_code_is_left_to_transformers(monkeypatch):
    """TransformerLens turns on trust_remote_code for some names (Qwen3, phi-2): refused before
    anything is fetched, as not TransformerLens's to load, so `auto` tries transformers' own classes."""
    import torch
    from transformer_lens import HookedTransformer

    from sae_acceptance.sources.backends import transformer_lens
    from sae_acceptance.sources.backends.checkpoint import NotForTransformerLens

    def fetched(*args, **kwargs):
        raise AssertionError("fetched")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fetched)
    with pytest.raises(NotForTransformerLens, match=r"'Qwen/Qwen3-0\.6B': .*running its repository's code") as excinfo:
        transformer_lens._load_hub("Qwen/Qwen3-0.6B", torch.device("cpu"), torch.float32, {}, 1)
    _one_line(excinfo)
