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


def _load(path: Path, backend: str, processing: dict | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backend(path, device="cpu", backend=backend, from_pretrained_kwargs=processing)


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
    assert tl.kind == TL_KIND and hf.kind == "hf" and tl.tail_only and hf.tail_only
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
    assert runs["hf"].backend == "hf" and runs["hf"].tail_only and runs["tl"].tail_only


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


# ------------------------------------------------------------------ TransformerLens 4: tails on the bridge

bridge_only = pytest.mark.skipif(
    TL_KIND != "transformer_lens_4",
    reason="TransformerLens 4's TransformerBridge is not installed here (CI's second environment runs these)",
)
PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}
# Where a plain Hugging Face forward computes each hook kind: the layer list, then (path in layer L, input or output)
PLAIN_MODULES = {
    "gpt_neox": (
        "gpt_neox.layers",
        {
            "hook_resid_post": ("", "output"),
            "hook_mlp_out": ("mlp", "output"),
            "attn.hook_z": ("attention.dense", "input"),
        },
    ),
    "llama": (
        "model.layers",
        {
            "hook_resid_post": ("", "output"),
            "hook_mlp_out": ("mlp", "output"),
            "attn.hook_z": ("self_attn.o_proj", "input"),
        },
    ),
    "gemma2": (
        "model.layers",
        {
            "hook_resid_post": ("", "output"),
            "hook_mlp_out": ("post_feedforward_layernorm", "output"),
            "attn.hook_z": ("self_attn.o_proj", "input"),
        },
    ),
}


def _sae_patch(sae, counted):
    """The engine's patch, written out: the SAE's reconstruction at counted positions (its head's
    slice only, for a single-head SAE), the activation elsewhere."""
    head = sae.hook_head_index

    def patch(act):
        part = act if head is None else act[..., head * sae.d_in : (head + 1) * sae.d_in]
        recon = sae.reconstruct(part.reshape(-1, sae.d_in))[0].reshape(part.shape)
        new = torch.where(counted[..., None], recon, part)
        if head is None:
            return new
        out = act.clone()
        out[..., head * sae.d_in : (head + 1) * sae.d_in] = new
        return out

    return patch


def _plain_ce_sums(model, family: str, tokens, counted, saes: dict) -> np.ndarray:
    """Per-sequence Σ CE of one plain forward of the Hugging Face model `model`, torch hooks
    putting each SAE's reconstruction where its hook is (in forward order, as a splice)."""
    layers, kinds = PLAIN_MODULES[family]
    handles = []
    for hook, sae in saes.items():
        _, layer, kind = hook.split(".", 2)
        inner, io = kinds[kind]
        module = model.get_submodule(".".join(filter(None, (layers, layer, inner))))
        fn = _sae_patch(sae, counted)
        if io == "output":
            handles.append(
                module.register_forward_hook(
                    lambda m, a, out, fn=fn: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
                )
            )
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]), *args[1:])))
    try:
        with torch.inference_mode():
            logits = model(input_ids=tokens, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    ce = -torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (ce * counted[:, :-1]).sum(1).numpy()


@bridge_only
@pytest.mark.parametrize(
    ("family", "processed"),
    [("gpt_neox", False), ("llama", False), ("gemma2", False), ("gpt_neox", True)],
    ids=["gpt_neox", "llama", "gemma2", "gpt_neox-processed"],
)
def test_bridge_tails_equal_its_full_passes_and_a_hooked_hf_forward(checkpoints, backends, tokens, family, processed):
    from sae_acceptance.sources.backends.bridge import BridgeBackend

    tail = (
        _load(checkpoints[family], "transformer_lens", PROCESSING)
        if processed
        else backends[(family, "transformer_lens")]
    )
    full = BridgeBackend.wrap(tail.model, tail.tokenizer, full_passes=True)
    counted = counted_mask(tokens, tail.special_token_ids())
    head_sae = random_topk_sae(d=8, d_sae=32, k=2, seed=5)
    head_sae.hook_head_index = 1
    by_hook = {
        "blocks.1.hook_resid_post": {"s": random_topk_sae(k=4, seed=1)},
        "blocks.1.hook_mlp_out": {"s": random_topk_sae(k=4, seed=2)},
        "blocks.2.attn.hook_z": {"s": head_sae},
    }
    pair = {
        "blocks.0.hook_mlp_out": random_topk_sae(k=8, seed=3),
        "blocks.1.hook_resid_post": random_topk_sae(k=8, seed=4),
    }
    a = run_model(tail, by_hook, tokens, counted, 5, False, splices={"pair": pair})
    b = run_model(full, by_hook, tokens, counted, 5, False, splices={"pair": pair})
    assert (a.backend, a.tail_only, b.tail_only) == ("transformer_lens_4", True, False)
    for hook in by_hook:
        for key, values in a.hooks[hook].sums["s"].scalars.items():
            np.testing.assert_array_equal(values, b.hooks[hook].sums["s"].scalars[key], err_msg=f"{hook} {key}")
    for key, values in a.splices["pair"].scalars.items():
        np.testing.assert_array_equal(values, b.splices["pair"].scalars[key], err_msg=f"splice {key}")

    hf_model = tail.model.original_model  # its decoder layers are the bridge's blocks, processed or not
    for hook, saes in by_hook.items():
        want = _plain_ce_sums(hf_model, family, tokens, counted, {hook: saes["s"]})
        np.testing.assert_allclose(a.hooks[hook].sums["s"].scalars["ce_recon"], want, rtol=1e-5, err_msg=hook)
    want = _plain_ce_sums(hf_model, family, tokens, counted, pair)
    np.testing.assert_allclose(a.splices["pair"].scalars["ce_recon"], want, rtol=1e-5)
    if processed:  # centred writing weights: the residual has mean 0 over d_model, as it has not unprocessed
        resid = {
            kind: backend.forward(tokens[:2], ["blocks.1.hook_resid_post"]).acts["blocks.1.hook_resid_post"].mean(-1)
            for kind, backend in (("processed", tail), ("raw", backends[(family, "transformer_lens")]))
        }
        assert resid["processed"].abs().max() < 1e-5 < resid["raw"].abs().max()


@bridge_only
def test_bridge_tail_runs_only_the_blocks_after_the_hook(backends, tokens):
    bridge = backends[("gpt_neox", "transformer_lens")]
    ran: list[int] = []
    handles = [
        block.register_forward_pre_hook(lambda m, args, i=i: ran.append(i))
        for i, block in enumerate(bridge.model.blocks)
    ]
    try:
        with torch.inference_mode():
            original = bridge.forward(tokens[:2], ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
            assert ran == [0, 1, 2]
            for hook, blocks in (("blocks.1.hook_resid_post", [2]), ("blocks.1.hook_mlp_out", [1, 2])):
                ran.clear()
                bridge.patched(original, [(hook, torch.zeros_like(original.acts[hook]))])
                assert ran == blocks, hook
    finally:
        for handle in handles:
            handle.remove()


def build_gptj_checkpoint(out: Path) -> Path:
    """GPT-J: an architecture the bridge boots but the family table does not know."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(4)
    config = GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=32, bos_token_id=0, eos_token_id=1
    )
    GPTJForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


@bridge_only
def test_bridge_outside_the_family_table_runs_full_passes(tmp_path, tokens):
    path = build_gptj_checkpoint(tmp_path / "gptj")
    bridge, hf = _load(path, "transformer_lens"), _load(path, "hf")
    assert not bridge.tail_only and not hf.tail_only
    counted = counted_mask(tokens, bridge.special_token_ids())
    sae = random_topk_sae(k=8, seed=6)
    on_bridge = run_model(bridge, {"blocks.1.hook_resid_post": {"s": sae}}, tokens, counted, 5, False)
    on_hf = run_model(hf, {"transformer.h.1": {"s": sae}}, tokens, counted, 5, False)
    assert not on_bridge.tail_only
    a, b = on_bridge.hooks["blocks.1.hook_resid_post"].sums["s"], on_hf.hooks["transformer.h.1"].sums["s"]
    for key, values in a.scalars.items():  # KL sums are differences of losses: their error is absolute
        np.testing.assert_allclose(values, b.scalars[key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(a.fired, b.fired)
