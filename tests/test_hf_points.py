"""SAEs that name Hugging Face points read and write exactly there.

Gemma Scope 2 SAEs and transcoders (through SAELens's `gemma_3` converter) and a SAELens
directory naming `hf_hook_name`/`hf_hook_name_out` run on tiny random Gemma 3 and Gemma 2
models built from a config; every per-sequence loss and error sum the engine gives must be
what a hand-written forward gives, one that reads and patches the named modules with torch
hooks. Points with no exact counterpart on the other backend are refused there in one line
naming the backend that can evaluate them.
"""

from __future__ import annotations

import pytest
import torch
from test_sae_converters import D, hub, write_gemma_2_transcoder, write_gemma_3  # noqa: F401

from sae_acceptance.engine import run_model
from sae_acceptance.errors import SourceError
from sae_acceptance.sources.backends.families import backend_for, backends_for
from sae_acceptance.sources.backends.hf import HFBackend
from sae_acceptance.sources.backends.transformer_lens import tl_site
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import load_sae, save_sae

VOCAB, N_LAYERS = 64, 3
GEMMA_3 = "google/gemma-scope-2-1b-pt"


def _randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Gemma's RMSNorm gains start at zero (a gain of 1): random ones tell a norm's output from its input."""
    g = torch.Generator().manual_seed(11)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.5
    return model.eval()


@pytest.fixture(scope="module")
def gemma3() -> HFBackend:
    """Gemma 3: a sliding-window layer, a global one with its own rotary base, then another sliding one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=8,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return HFBackend.wrap(_randomise_norms(Gemma3ForCausalLM(config)))


@pytest.fixture(scope="module")
def gemma2() -> HFBackend:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(4)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        sliding_window=4,
        initializer_range=0.3,
        final_logit_softcapping=30.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return HFBackend.wrap(_randomise_norms(Gemma2ForCausalLM(config)))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (6, 12), generator=torch.Generator().manual_seed(5))


def _module(model: torch.nn.Module, point: str) -> tuple[torch.nn.Module, bool]:
    """(module, whether its input is meant) of `model.layers.1.mlp.input`-style names."""
    path, _, io = point.rpartition(".")
    if io not in ("input", "output"):
        path, io = point, "output"
    return model.get_submodule(path), io == "input"


def handwritten(model: torch.nn.Module, tokens: torch.Tensor, sae: SAE) -> dict[str, torch.Tensor]:
    """Per-sequence Σ CE with the SAE's output patched in, and Σ‖a − â‖², from one forward with torch hooks."""
    seen: dict[str, torch.Tensor] = {}

    def read(module, args, output=None):
        seen["x"] = args[0] if output is None else output

    def write(module, args, output):
        seen["a"] = output
        seen["recon"] = sae.reconstruct(seen["x"].reshape(-1, sae.d_in))[0].reshape(output.shape)
        return seen["recon"]

    reader, reads_input = _module(model, sae.hook_name)
    writer, writes_input = _module(model, sae.hook_name_out or sae.hook_name)
    assert not writes_input
    handles = [
        reader.register_forward_pre_hook(read) if reads_input else reader.register_forward_hook(read),
        writer.register_forward_hook(write),  # after the reader: it sees what the reader stored
    ]
    try:
        with torch.inference_mode():
            logits = model(input_ids=tokens, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    log_p = torch.log_softmax(logits.float(), -1)
    ce = -log_p[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return {
        "ce_recon": ce.double().sum(1),
        "sq_err": (seen["a"].float() - seen["recon"].float()).pow(2).sum(-1).double().sum(1),
    }


def assert_engine_is_handwritten(backend: HFBackend, tokens: torch.Tensor, sae: SAE) -> None:
    """The engine's tails (each decoder layer given its own mask and rotary table) against one full forward."""
    assert backend.tail_only
    counted = torch.ones_like(tokens, dtype=torch.bool)
    run = run_model(backend, {sae.hook_name: {"s": sae}}, tokens, counted, batch_size=4, progress=False)
    sums = run.hooks[sae.hook_name].sums["s"].scalars
    expected = handwritten(backend.model, tokens, sae)
    for key, values in expected.items():
        torch.testing.assert_close(torch.as_tensor(sums[key]), values, rtol=1e-5, atol=1e-6, msg=key)
    ce_orig = torch.as_tensor(sums["ce_orig"])
    assert not torch.allclose(ce_orig, expected["ce_recon"])  # the patch changed the loss: it really landed


# case -> (writer, the hooks the SAE must carry)
GEMMA_3_CASES = {
    "resid_post": (write_gemma_3("resid_post_all", layer=2), ("model.layers.2.output", None)),
    "mlp_out": (write_gemma_3("mlp_out_all", layer=1), ("model.layers.1.post_feedforward_layernorm.output", None)),
    "transcoder": (
        write_gemma_3("transcoder_all", layer=1),
        ("model.layers.1.pre_feedforward_layernorm.output", "model.layers.1.post_feedforward_layernorm.output"),
    ),
    "skip_transcoder": (
        write_gemma_3("transcoder_all", affine=True, layer=0),
        ("model.layers.0.pre_feedforward_layernorm.output", "model.layers.0.post_feedforward_layernorm.output"),
    ),
}


@pytest.mark.parametrize("case", GEMMA_3_CASES)
def test_gemma_scope_2_reads_and_writes_its_named_modules_on_gemma_3(hub, gemma3, tokens, case):  # noqa: F811
    writer, hooks = GEMMA_3_CASES[case]
    sae = load_sae(f"sae-lens://{writer(hub)}/sae")
    assert (sae.hook_name, sae.hook_name_out) == hooks
    assert_engine_is_handwritten(gemma3, tokens, sae)
    if sae.transcoder:  # no TransformerLens hook is the pre-MLP norm's output: `auto` means hf
        assert backends_for(*hooks) == ("hf",) and backend_for("auto", *hooks) == "hf"


def test_a_saelens_directory_naming_hf_points_runs_there_on_gemma_2(tmp_path, gemma2, tokens):
    g = torch.Generator().manual_seed(8)
    transcoder = SAE(
        torch.randn(D, 48, generator=g) * 0.3,
        torch.randn(48, generator=g) * 0.1,
        torch.randn(48, D, generator=g) * 0.3,
        torch.randn(D, generator=g) * 0.3,
        architecture="jumprelu",
        threshold=torch.rand(48, generator=g) * 0.3,
        apply_b_dec_to_input=False,
        hook_name="blocks.1.hook_mlp_in",  # SAELens's TransformerLens name: the residual before the norm
        hook_name_out="blocks.1.hook_mlp_out",
    )
    points = {
        "hf_hook_name": "model.layers.1.pre_feedforward_layernorm.output",
        "hf_hook_name_out": "model.layers.1.post_feedforward_layernorm.output",
    }
    sae = load_sae(save_sae(transcoder, tmp_path / "tc", metadata=points))
    assert (sae.hook_name, sae.hook_name_out) == tuple(points.values())
    assert_engine_is_handwritten(gemma2, tokens, sae)


def test_gemma_scope_transcoders_on_gemma_2_run_on_transformer_lens_only(hub, gemma2):  # noqa: F811
    """Gemma Scope's Gemma 2 transcoders read the pre-MLP RMSNorm before its gain (TransformerLens'
    `ln2.hook_normalized`), which no Hugging Face module outputs."""
    sae = load_sae(f"sae-lens://{write_gemma_2_transcoder(hub)}/sae")
    assert (sae.hook_name, sae.hook_name_out) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert backends_for(sae.hook_name, sae.hook_name_out) == ("transformer_lens",)
    assert backend_for("auto", sae.hook_name, sae.hook_name_out) == "transformer_lens"
    with pytest.raises(
        SourceError,
        match=r"^hook 'blocks\.1\.ln2\.hook_normalized' has no module path on Gemma2ForCausalLM; .*"
        r'evaluate it with backend = "transformer_lens"$',
    ):
        gemma2.site("blocks.1.ln2.hook_normalized")


TL_NAMES = {
    f"blocks.{layer}.{kind}"
    for layer in range(N_LAYERS)
    for kind in ("hook_resid_pre", "hook_resid_post", "hook_mlp_in", "ln2.hook_normalized", "hook_mlp_out")
    + ("attn.hook_z", "hook_attn_out")
}


@pytest.mark.parametrize(
    ("point", "equal"),
    [
        ("model.layers.1.output", "blocks.1.hook_resid_post"),
        ("model.layers.1.input", "blocks.1.hook_resid_pre"),
        ("model.layers.1.self_attn.o_proj.input", "blocks.1.attn.hook_z"),
        ("model.layers.1.post_feedforward_layernorm.output", "blocks.1.hook_mlp_out"),
        ("model.layers.1.post_attention_layernorm", "blocks.1.hook_attn_out"),
        ("model.layers.1.pre_feedforward_layernorm.output", None),
        ("model.layers.1.mlp", None),  # Gemma's MLP output comes before its post-norm: hook_mlp_out is after
    ],
)
def test_transformer_lens_takes_a_module_point_only_where_a_hook_equals_it(point, equal):
    if equal is None:
        with pytest.raises(
            SourceError,
            match=rf"^hook '{point}': no TransformerLens hook of Gemma3ForCausalLM is exactly this "
            r'Hugging Face module point; evaluate it with backend = "hf"$',
        ):
            tl_site(point, TL_NAMES, N_LAYERS, "Gemma3ForCausalLM")
    else:
        assert tl_site(point, TL_NAMES, N_LAYERS, "Gemma3ForCausalLM").name == equal


def test_auto_keeps_its_choice_where_both_backends_can():
    assert backends_for("model.layers.1.output", "blocks.2.hook_mlp_out") == ("transformer_lens", "hf")
    assert backend_for("auto", "model.layers.1.output") == "auto"
    assert backend_for("transformer_lens", "model.layers.1.pre_feedforward_layernorm.output") == "transformer_lens"
    # the MLP's own output is hook_mlp_out on Llama but not on Gemma: without the model, only hf is sure
    assert backends_for("model.layers.1.mlp") == ("hf",)
