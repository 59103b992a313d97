"""``sae-lens://`` for every conversion function in SAELens's registry, against SAELens itself.

Per conversion function, a tiny SAE is written in that converter's on-disk
layout into an offline Hugging Face cache (huggingface_hub's own layout) and
registered as a release in SAELens's pretrained directory. The project's
`load_sae` and SAELens's `SAE.from_pretrained` then read the same cache, and
their latents and outputs must agree. Converters the project refuses are
refused with one line naming the function and why.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import load_sae, save_sae

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.loading import pretrained_sae_loaders as loaders  # noqa: E402
from sae_lens.loading.pretrained_saes_directory import (  # noqa: E402
    PretrainedSAELookup,
    get_pretrained_saes_directory,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
D, F, HEADS = 16, 64, 4


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g(seed)) * scale


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """`write(repo_id, filename) -> Path` in an offline hub cache; `release(...)` registers a directory entry."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    # SAELens reads safetensors headers over HTTP; in this offline test it reads the cached file
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", _cached_shapes)
    directory = get_pretrained_saes_directory()

    def write(repo_id: str, filename: str) -> Path:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        file = repo / "snapshots" / COMMIT / filename
        file.parent.mkdir(parents=True, exist_ok=True)
        return file

    def release(func: str, repo_id: str, folder: str, overrides=None, factor: float | None = None) -> str:
        name = f"test-{func}-{len(directory)}"
        monkeypatch.setitem(
            directory,
            name,
            PretrainedSAELookup(
                release=name,
                repo_id=repo_id,
                model="m",
                conversion_func=func,
                saes_map={"sae": folder},
                expected_var_explained={},
                expected_l0={},
                neuronpedia_id={},
                norm_scaling_factor={"sae": factor} if factor else {},
                config_overrides=overrides,
            ),
        )
        return name

    write.release = release
    return write


def _cached_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    from huggingface_hub import hf_hub_download

    with safe_open(hf_hub_download(repo_id, filename), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def torch_file(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    torch.save(tensors, file)


def npz_file(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    np.savez(file, **{k: v.numpy() for k, v in tensors.items()})


def gemma_npz(seed: int) -> dict[str, torch.Tensor]:
    return {
        "w_enc": rand(D, F, seed=seed),
        "w_dec": rand(F, D, seed=seed + 1),
        "b_enc": rand(F, seed=seed + 2, scale=0.1),
        "b_dec": rand(D, seed=seed + 3),
        "threshold": rand(F, seed=seed + 4).abs(),
    }


def dl_config(dict_class: str, k: int | None = 8) -> dict:
    return {
        "trainer": {
            "dict_class": dict_class,
            "activation_dim": D,
            "dict_size": F,
            "k": k,
            "layer": 3,
            "lm_name": "google/gemma-2-2b",
        },
        "buffer": {"ctx_len": 128},
    }


def dl_tensors(dict_class: str, seed: int) -> dict[str, torch.Tensor]:
    enc, dec = rand(F, D, seed=seed), rand(D, F, seed=seed + 1)
    b_enc, b_dec = rand(F, seed=seed + 2, scale=0.1), rand(D, seed=seed + 3)
    if dict_class == "GatedAutoEncoder":
        return {
            "encoder.weight": enc,
            "decoder.weight": dec,
            "decoder_bias": b_dec,
            "r_mag": rand(F, seed=seed + 4),
            "gate_bias": b_enc,
            "mag_bias": rand(F, seed=seed + 5, scale=0.1),
        }
    if dict_class == "JumpReluAutoEncoder":
        return {
            "W_enc": enc.T.contiguous(),
            "b_enc": b_enc,
            "W_dec": dec.T.contiguous(),
            "b_dec": b_dec,
            "threshold": rand(F, seed=seed + 4).abs(),
        }
    if dict_class == "AutoEncoder":
        return {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "bias": b_dec}
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {
            "W_enc": enc.T.contiguous(),
            "b_enc": b_enc,
            "W_dec": dec.T.contiguous(),
            "b_dec": b_dec,
            "k": torch.tensor(8, dtype=torch.int),
            "threshold": torch.tensor(0.2),
            "group_sizes": torch.tensor([16, 48]),
        }
    return {
        "encoder.weight": enc,
        "encoder.bias": b_enc,
        "decoder.weight": dec,
        "b_dec": b_dec,
        "k": torch.tensor(8, dtype=torch.int),
        "threshold": torch.tensor(0.2),
    }


def write_dictionary_learning(dict_class: str) -> Callable:
    def write(hub) -> str:
        folder = f"saebench/resid_post_layer_3/{dict_class}"
        torch_file(hub("canrager/saebench", f"{folder}/ae.pt"), dl_tensors(dict_class, 10))
        hub("canrager/saebench", f"{folder}/config.json").write_text(json.dumps(dl_config(dict_class)))
        return hub.release("dictionary_learning_1", "canrager/saebench", folder, {"d_in": D, "d_sae": F})

    return write


def write_sae_lens(hub) -> str:  # a gated SAE in SAELens's own format
    sae = SAE(
        rand(D, F, seed=1),
        rand(F, seed=2, scale=0.1),
        rand(F, D, seed=3),
        rand(D, seed=4),
        architecture="gated",
        b_mag=rand(F, seed=5, scale=0.1),
        r_mag=rand(F, seed=6),
        hook_name="blocks.3.hook_resid_post",
    )
    save_sae(sae, hub("acme/saes", "gated/cfg.json").parent)
    return hub.release("sae_lens", "acme/saes", "gated")


def write_gemma_2(hub) -> str:
    folder = "layer_3/width_16k/average_l0_50"
    npz_file(hub("google/gemma-scope-2b-pt-res", f"{folder}/params.npz"), gemma_npz(20))
    return hub.release("gemma_2", "google/gemma-scope-2b-pt-res", folder, {"d_in": D, "d_sae": F})


def write_gemma_2_embedding(hub) -> str:
    folder = "embedding/width_4k/average_l0_6"
    npz_file(hub("google/gemma-scope-2b-pt-res", f"{folder}/params.npz"), gemma_npz(25))
    return hub.release("gemma_2", "google/gemma-scope-2b-pt-res", folder, {"d_in": D, "d_sae": F})


# Gemma Scope 2 folder kind -> the Hugging Face points its config.json names (layer L)
GEMMA_3_SITES = {
    "resid_post_all": ("model.layers.{L}.output", None),
    "mlp_out_all": ("model.layers.{L}.post_feedforward_layernorm.output", None),
    "transcoder_all": (
        "model.layers.{L}.pre_feedforward_layernorm.output",
        "model.layers.{L}.post_feedforward_layernorm.output",
    ),
}


def write_gemma_3(kind: str, affine: bool = False, config: bool = True, layer: int = 2, seed: int = 30) -> Callable:
    """A Gemma Scope 2 folder (`params.safetensors`, and `config.json` as the real ones are, with its
    Hugging Face points; without it SAELens infers them from the folder name)."""

    def write(hub) -> str:
        folder = f"{kind}/layer_{layer}_width_16k_l0_small{'_affine' if affine else ''}"
        raw = gemma_npz(seed)
        if affine:
            raw["affine_skip_connection"] = rand(D, D, seed=seed + 6, scale=0.1)
        save_file(raw, str(hub("google/gemma-scope-2-1b-pt", f"{folder}/params.safetensors")))
        if config:
            hook_in, hook_out = (None if h is None else h.format(L=layer) for h in GEMMA_3_SITES[kind])
            cfg = {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt", "hf_hook_point_in": hook_in}
            if hook_out is not None:
                cfg |= {"hf_hook_point_out": hook_out, "affine_connection": affine}
            hub("google/gemma-scope-2-1b-pt", f"{folder}/config.json").write_text(json.dumps(cfg))
        return hub.release("gemma_3", "google/gemma-scope-2-1b-pt", folder)

    return write


def linear_tensors(
    seed: int, enc="encoder.weight", dec="decoder.weight", benc="encoder.bias", bdec="decoder.bias", dtype=torch.float32
) -> dict[str, torch.Tensor]:
    return {
        enc: rand(F, D, seed=seed).to(dtype),
        dec: rand(D, F, seed=seed + 1).to(dtype),
        benc: rand(F, seed=seed + 2, scale=0.1).to(dtype),
        bdec: rand(D, seed=seed + 3).to(dtype),
    }


def write_llama_scope(hub) -> str:
    repo, folder = "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L3R-8x"
    save_file(linear_tensors(40, dtype=torch.bfloat16), str(hub(repo, f"{folder}/checkpoints/final.safetensors")))
    hp = {
        "d_model": D,
        "d_sae": F,
        "jump_relu_threshold": 0.05,
        "hook_point_in": "blocks.3.hook_resid_post",
        "dataset_average_activation_norm": {"in": 2.5, "out": 2.5},
    }
    hub(repo, f"{folder}/hyperparams.json").write_text(json.dumps(hp))
    return hub.release("llama_scope", repo, folder, factor=1.7)


def write_llama_scope_r1(hub) -> str:
    repo, folder = "fnlp/Llama-Scope-R1-Distill", "800M-Slimpajama-0-OpenR1-Math-220k/L3R"
    tensors = {**linear_tensors(50), "log_jumprelu_threshold": rand(F, seed=55) - 2}
    save_file(tensors, str(hub(repo, f"{folder}/sae_weights.safetensors")))
    cfg = {"d_model": D, "expansion_factor": F // D, "hook_point_in": "blocks.3.hook_resid_post"}
    hub(repo, f"{folder}/config.json").write_text(json.dumps(cfg))
    return hub.release("llama_scope_r1_distill", repo, folder, factor=0.8)


def write_deepseek(hub) -> str:
    repo, file = "qresearch/DeepSeek-R1-Distill-Llama-8B-SAE-l19", "DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt"
    torch_file(hub(repo, file), linear_tensors(60, dtype=torch.bfloat16))
    return hub.release("deepseek_r1", repo, file, {"d_in": D, "d_sae": F})


def write_qwen(hub) -> str:
    repo = "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
    tensors = {
        "W_enc": rand(F, D, seed=70),
        "W_dec": rand(D, F, seed=71),
        "b_enc": rand(F, seed=72, scale=0.1),
        "b_dec": rand(D, seed=73),
    }
    torch_file(hub(repo, "layer3.sae.pt"), tensors)
    return hub.release("qwen_scope", repo, "layer3.sae.pt", {"d_in": D, "d_sae": F})


def write_goodfire(hub) -> str:
    repo, file = "Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch_file(
        hub(repo, file),
        linear_tensors(
            80, "encoder_linear.weight", "decoder_linear.weight", "encoder_linear.bias", "decoder_linear.bias"
        ),
    )
    return hub.release("goodfire", repo, file, {"d_in": D, "d_sae": F})


def write_connor(hub) -> str:
    repo, file = "ckkissane/attn-saes", "gpt2-small_L3_Hcat_z_v9.pt"
    tensors = {
        "W_enc": rand(D, F, seed=90),
        "W_dec": rand(F, D, seed=91),
        "b_enc": rand(F, seed=92, scale=0.1),
        "b_dec": rand(D, seed=93),
    }
    torch_file(hub(repo, file), tensors)
    hub(repo, "gpt2-small_L3_Hcat_z_v9_cfg.json").write_text(
        json.dumps({"act_size": D, "dict_size": F, "act_name": "blocks.3.attn.hook_z"})
    )
    return hub.release("connor_rob_hook_z", repo, file)


def write_gemma_2_transcoder(hub) -> str:
    repo, folder = "google/gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_76"
    npz_file(hub(repo, f"{folder}/params.npz"), gemma_npz(100))
    return hub.release("gemma_2_transcoder", repo, folder, {"d_in": D, "d_out": D, "d_sae": F})


def write_mwhanna(hub) -> str:
    repo = "mwhanna/qwen3-4b-transcoders"
    tensors = {
        "W_enc": rand(F, D, seed=110),
        "b_enc": rand(F, seed=111, scale=0.1),
        "W_dec": rand(F, D, seed=112),
        "b_dec": rand(D, seed=113),
    }
    save_file(tensors, str(hub(repo, "layer_3.safetensors")))
    wandb = {"d_model": {"value": D}, "d_feature": {"value": F}, "batch_size": {"value": 8}}
    hub(repo, "wandb-config.yaml").write_text(yaml.safe_dump(wandb))
    hub(repo, "config.yaml").write_text(yaml.safe_dump({"model_name": "Qwen/Qwen3-4B"}))
    return hub.release("mwhanna_transcoder", repo, "layer_3.safetensors")


# case -> (writer, expected (architecture, transcoder, hook_name, hook_name_out))
CASES: dict[str, tuple[Callable, tuple]] = {
    "sae_lens-gated": (write_sae_lens, ("gated", False, "blocks.3.hook_resid_post", None)),
    "gemma_2": (write_gemma_2, ("jumprelu", False, "blocks.3.hook_resid_post", None)),
    "gemma_2-embedding": (write_gemma_2_embedding, ("jumprelu", False, "hook_embed", None)),
    "gemma_3-resid": (write_gemma_3("resid_post_all"), ("jumprelu", False, "model.layers.2.output", None)),
    "gemma_3-mlp_out-inferred": (  # no config.json: SAELens infers the points from the folder name
        write_gemma_3("mlp_out_all", config=False),
        ("jumprelu", False, "model.layers.2.post_feedforward_layernorm.output", None),
    ),
    "gemma_3-transcoder": (
        write_gemma_3("transcoder_all"),
        (
            "jumprelu",
            True,
            "model.layers.2.pre_feedforward_layernorm.output",
            "model.layers.2.post_feedforward_layernorm.output",
        ),
    ),
    "gemma_3-skip_transcoder": (
        write_gemma_3("transcoder_all", affine=True),
        (
            "jumprelu",
            True,
            "model.layers.2.pre_feedforward_layernorm.output",
            "model.layers.2.post_feedforward_layernorm.output",
        ),
    ),
    "llama_scope": (write_llama_scope, ("jumprelu", False, "blocks.3.hook_resid_post", None)),
    "llama_scope_r1_distill": (write_llama_scope_r1, ("jumprelu", False, "blocks.3.hook_resid_post", None)),
    "deepseek_r1": (write_deepseek, ("standard", False, "blocks.19.hook_resid_post", None)),
    "qwen_scope": (write_qwen, ("topk", False, "model.layers.3", None)),  # Qwen Scope names its HF point
    "goodfire": (write_goodfire, ("standard", False, "blocks.19.hook_resid_post", None)),
    "connor_rob_hook_z": (write_connor, ("standard", False, "blocks.3.attn.hook_z", None)),
    "gemma_2_transcoder": (
        write_gemma_2_transcoder,
        ("jumprelu", True, "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"),
    ),
    "mwhanna_transcoder": (write_mwhanna, ("standard", True, "blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out")),
    **{
        f"dictionary_learning_1-{c}": (write_dictionary_learning(c), (a, False, "blocks.3.hook_resid_post", None))
        for c, a in (
            ("AutoEncoder", "standard"),
            ("GatedAutoEncoder", "gated"),
            ("JumpReluAutoEncoder", "jumprelu"),
            ("AutoEncoderTopK", "topk"),
            ("BatchTopKSAE", "jumprelu"),
            ("MatryoshkaBatchTopKSAE", "jumprelu"),
        )
    },
}


def from_pretrained(release: str, dtype: torch.dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sae_lens.SAE.from_pretrained(release, "sae", dtype=str(dtype).removeprefix("torch."))


# our tensor -> SAELens's parameter of the same meaning
THEIR_NAMES = {"b_enc": ("b_enc", "b_gate")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_converted_release_is_saelens_from_pretrained_bit_for_bit(hub, case, dtype):
    """Every tensor as `SAE.from_pretrained(dtype=...)` gives it, bit for bit; then the same latents and outputs."""
    writer, (architecture, transcoder, hook, hook_out) = CASES[case]
    release = writer(hub)
    ours = load_sae(f"sae-lens://{release}/sae", dtype=dtype)
    theirs = from_pretrained(release, dtype)
    assert (ours.architecture, ours.transcoder, ours.hook_name, ours.hook_name_out) == (
        architecture,
        transcoder,
        hook,
        hook_out,
    )
    params = dict(theirs.named_parameters())
    for name, tensor in ours.tensors().items():
        their = next(params[n] for n in THEIR_NAMES.get(name, (name,)) if n in params)
        assert tensor.dtype == their.dtype == dtype, name
        assert torch.equal(tensor, their.detach()), f"{name} differs from SAELens's"
    if dtype != torch.float32:
        return  # same tensors; bfloat16 forwards differ in the order of rounding only
    x = torch.randn(300, ours.d_in, generator=g(7)) * 2
    with torch.no_grad():
        their_in = x.unflatten(-1, (HEADS, -1)) if hook.endswith("hook_z") else x  # SAELens reshapes hook_z itself
        their_latents = theirs.encode(their_in)
        their_out = theirs(their_in).reshape(x.shape[0], -1)
    out, code = ours.reconstruct(x)
    latents = code.dense(ours.d_sae)
    assert bool((latents != 0).any()) and bool((latents == 0).any())  # the encoder really selects
    torch.testing.assert_close(latents, their_latents, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, their_out, rtol=1e-6, atol=1e-5)


def test_a_release_comes_out_in_float32_unless_asked(hub):
    """Llama Scope ships bfloat16: read in float32, its norm factor folds in float32 (SAELens's
    from_pretrained default), not rounded to bfloat16 first."""
    release = write_llama_scope(hub)
    sae = load_sae(f"sae-lens://{release}/sae")
    assert sae.dtype == torch.float32
    rounded = load_sae(f"sae-lens://{release}/sae", dtype=torch.bfloat16)
    assert not torch.equal(sae.W_enc, rounded.W_enc.float())  # the fold's own rounding: gone in float32
    assert load_sae(f"sae-lens://{write_gemma_2(hub)}/sae", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_refused_conversion_functions_say_which_and_why(hub):
    for func, folder, why in (
        ("temporal", "gemma-2-2B/layer_12/temporal", "latents depend on earlier tokens"),
        ("mntss_clt_layer_transcoder", "3", "cross-layer transcoder"),
    ):
        release = hub.release(func, "acme/x", folder)
        with pytest.raises(
            SAEFormatError,
            match=rf"^sae-lens://{release}/sae: SAELens conversion function '{func}' is refused: .*{why}",
        ):
            load_sae(f"sae-lens://{release}/sae")


def test_a_pickle_holding_code_is_refused_unrun(hub, tmp_path):
    """A `.pt` that would run code when unpickled is refused with one line; the code never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    repo = "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
    torch.save({"W_enc": Payload()}, hub(repo, "layer3.sae.pt"))
    release = hub.release("qwen_scope", repo, "layer3.sae.pt")
    with pytest.raises(
        SAEFormatError, match=r"layer3\.sae\.pt: holds Python objects other than tensors; refused without running it"
    ):
        load_sae(f"sae-lens://{release}/sae")
    assert not marker.exists()
