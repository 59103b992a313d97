"""Backends agree: TransformerLens (3 here, 4 in CI's second environment) and Hugging Face give the
same metrics on the same checkpoints and SAEs, for three families and three kinds of hook."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny_checkpoint, random_topk_sae

from sae_acceptance.engine import run_model
from sae_acceptance.reference.language import TopicLanguage, build_tokenizer
from sae_acceptance.sources.backends.hf import HFBackend
from sae_acceptance.sources.model import load_backend, transformer_lens_major
from sae_acceptance.sources.tokens import counted_mask

HOOKS = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"]
TL_KIND = "transformer_lens" if transformer_lens_major() < 4 else "transformer_lens_4"


def build_llama_checkpoint(out: Path) -> Path:
    """Llama-style: grouped-query attention (4 query heads, 2 key/value heads), RoPE, RMSNorm; no tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def build_gpt2_checkpoint(out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=32,
        n_ctx=32,  # as the hub ships it
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=1,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(out, safe_serialization=True)
    build_tokenizer(VOCAB).save_pretrained(out)
    return out


def build_gemma2_checkpoint(out: Path) -> Path:
    """Gemma 2: sandwich norms, sliding-window layers, attention and final-logit soft-capping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(3)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        sliding_window=8,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        query_pre_attn_scalar=8,
    )
    Gemma2ForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


BUILDERS = {
    "gpt_neox": build_tiny_checkpoint,
    "llama": build_llama_checkpoint,
    "gpt2": build_gpt2_checkpoint,
    "gemma2": build_gemma2_checkpoint,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _load(path: Path, backend: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backend(path, device="cpu", backend=backend)


class _Backends(dict):
    """(family, backend) -> a loaded backend, loaded on first use."""

    def __init__(self, checkpoints):
        super().__init__()
        self.checkpoints = checkpoints

    def __missing__(self, key):
        family, kind = key
        if family == "gemma2" and kind == "transformer_lens" and TL_KIND == "transformer_lens":
            pytest.skip("TransformerLens 3 converts Gemma 2 from hub names only, not from a local directory")
        self[key] = _load(self.checkpoints[family], kind)
        return self[key]


@pytest.fixture(scope="module")
def backends(checkpoints):
    return _Backends(checkpoints)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.from_numpy(TopicLanguage(VOCAB, n_topics=4, seed=0).sequences(12, 16, seed=3))


def _saes(seed: int):
    return {"k4": random_topk_sae(k=4, seed=seed), "k16": random_topk_sae(k=16, seed=seed + 1)}


# differences of two losses: their error is the losses' absolute error (~1e-7 nats), checked as such
DIFFERENCES = ("delta_ce", "ce_loss_score", "kl_div_score")


def _assert_metrics_agree(a, b, rtol=1e-5):
    """Every measured quantity to `rtol` (per-sequence sums and pooled metrics); differences of
    losses to 1e-6 nats."""
    for key, values in a.scalars.items():
        np.testing.assert_allclose(values, b.scalars[key], rtol=rtol, atol=1e-6, err_msg=key)
    ma, mb = a.metrics(), b.metrics()
    for key in ma:
        if key not in DIFFERENCES:
            np.testing.assert_allclose(ma[key], mb[key], rtol=rtol, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(ma["delta_ce"], mb["delta_ce"], atol=1e-6)
    np.testing.assert_array_equal(a.fired, b.fired)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_transformer_lens_and_hf_agree(backends, tokens, family):
    tl, hf = backends[(family, "transformer_lens")], backends[(family, "hf")]
    assert tl.kind == TL_KIND and hf.kind == "hf" and hf.tail_only
    counted = counted_mask(tokens, hf.special_token_ids())
    assert tl.special_token_ids() == hf.special_token_ids() == [0, 1, 2]
    by_hook = {hook: _saes(i) for i, hook in enumerate(HOOKS)}  # TransformerLens names on both
    runs = {
        kind: run_model(b, by_hook, tokens, counted, batch_size=5, progress=False)
        for kind, b in (("tl", tl), ("hf", hf))
    }
    for hook, saes in by_hook.items():
        assert tl.hook_width(hook) == hf.hook_width(hook) == 32
        for name in saes:
            _assert_metrics_agree(runs["tl"].hooks[hook].sums[name], runs["hf"].hooks[hook].sums[name])
    assert runs["hf"].backend == "hf" and runs["hf"].tail_only


@pytest.mark.parametrize("family", list(BUILDERS))
def test_hf_tail_equals_its_full_pass(backends, tokens, family):
    tail = backends[(family, "hf")]
    full = HFBackend.wrap(tail.model, tail.tokenizer, full_passes=True)
    assert not full.tail_only
    counted = counted_mask(tokens, tail.special_token_ids())
    by_hook = {hook: _saes(i) for i, hook in enumerate(["blocks.0.hook_resid_pre", *HOOKS, "blocks.2.hook_resid_post"])}
    splices = {"pair": {"blocks.0.hook_resid_pre": random_topk_sae(k=8), "blocks.1.attn.hook_z": random_topk_sae(k=8)}}
    a = run_model(tail, by_hook, tokens, counted, 5, False, splices=splices)
    b = run_model(full, by_hook, tokens, counted, 5, False, splices=splices)
    for hook, saes in by_hook.items():
        for name in saes:
            for key, values in a.hooks[hook].sums[name].scalars.items():
                np.testing.assert_array_equal(values, b.hooks[hook].sums[name].scalars[key], err_msg=f"{hook} {key}")
    for key in ("ce_recon", "kl_recon", "ce_ablate", "kl_ablate"):
        np.testing.assert_array_equal(a.splices["pair"].scalars[key], b.splices["pair"].scalars[key])


def test_sparsify_hookpoint_on_hf_equals_resid_post_on_transformer_lens(backends, tokens):
    tl, hf = backends[("gpt_neox", "transformer_lens")], backends[("gpt_neox", "hf")]
    counted = counted_mask(tokens, hf.special_token_ids())
    sae = random_topk_sae(k=8, seed=4)
    on_hf = run_model(hf, {"layers.1": {"s": sae}}, tokens, counted, 6, False).hooks["layers.1"].sums["s"]
    on_tl = run_model(tl, {"blocks.1.hook_resid_post": {"s": sae}}, tokens, counted, 6, False)
    _assert_metrics_agree(on_hf, on_tl.hooks["blocks.1.hook_resid_post"].sums["s"])
    assert hf.site("layers.1").name == "gpt_neox.layers.1" and hf.hook_layer("layers.1") == 1


@pytest.mark.parametrize(
    ("family", "hook", "path"),
    [
        ("gpt_neox", "blocks.1.hook_mlp_out", "gpt_neox.layers.1.mlp"),
        ("gpt_neox", "blocks.2.attn.hook_z", "gpt_neox.layers.2.attention.dense.input"),
        ("gpt_neox", "blocks.0.hook_resid_pre", "gpt_neox.layers.0.input"),
        ("llama", "blocks.1.hook_resid_post", "model.layers.1"),
        ("llama", "blocks.1.attn.hook_z", "model.layers.1.self_attn.o_proj.input"),
        ("gpt2", "blocks.1.hook_mlp_out", "transformer.h.1.mlp"),
        ("gpt2", "blocks.1.attn.hook_z", "transformer.h.1.attn.c_proj.input"),
    ],
)
def test_hook_names_map_both_ways(backends, family, hook, path):
    tl, hf = backends[(family, "transformer_lens")], backends[(family, "hf")]
    assert hf.site(hook).name == path
    assert tl.site(path).name == hook
    assert hf.site(path + ("" if path.endswith(".input") else ".output")).name == path


def test_llama_without_tokenizer_files_loads_and_evaluates(checkpoints, backends, tokens):
    assert not any(checkpoints["llama"].glob("tokenizer*"))
    for kind in ("transformer_lens", "hf"):
        backend = backends[("llama", kind)]
        assert backend.tokenizer is None
        assert backend.special_token_ids() == [0, 1, 2]  # from config.json
        assert (backend.n_ctx, backend.d_vocab) == (32, VOCAB)
    auto = _load(checkpoints["llama"], "auto")
    counted = counted_mask(tokens, auto.special_token_ids())
    run = run_model(auto, {"blocks.1.hook_resid_post": {"s": random_topk_sae(k=8)}}, tokens, counted, 6, False)
    assert np.isfinite(run.hooks["blocks.1.hook_resid_post"].sums["s"].metrics()["ce_rec"])
