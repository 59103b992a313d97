"""dictionary_learning directories (`ae.pt` + `config.json`) -> `SAE`, read as tensors only.

One mapping per dictionary class of dictionary_learning (`trainer.dict_class`).
BatchTopK and Matryoshka BatchTopK SAEs run at inference with their learned
threshold, which is a JumpReLU with that threshold for every latent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.formats.tensors import (
    read_json_object,
    read_torch,
    require,
    whole_number,
)
from sae_acceptance.sources.sae import SAE

WEIGHTS = "ae.pt"
CONFIG = "config.json"


def _linear(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.Linear encoder/decoder ([out, in] weights) -> W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""
    return {"W_enc": t["encoder.weight"].T.contiguous(), "W_dec": t["decoder.weight"].T.contiguous()}


def _threshold(t: dict[str, torch.Tensor]) -> torch.Tensor:
    d_sae = t["b_enc"].shape[0] if "b_enc" in t else t["encoder.bias"].shape[0]
    return t["threshold"].float().expand(d_sae).clone() if t["threshold"].ndim == 0 else t["threshold"]


# dict_class -> (tensors it must hold, how they map onto the SAE's fields)
CLASSES: dict[str, tuple[tuple[str, ...], Any]] = {
    "AutoEncoder": (
        ("encoder.weight", "encoder.bias", "decoder.weight", "bias"),
        lambda t: {**_linear(t), "b_enc": t["encoder.bias"], "b_dec": t["bias"], "architecture": "standard"},
    ),
    "GatedAutoEncoder": (
        ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"),
        lambda t: {
            **_linear(t),
            "b_enc": t["gate_bias"],
            "b_dec": t["decoder_bias"],
            "b_mag": t["mag_bias"],
            "r_mag": t["r_mag"],
            "architecture": "gated",
        },
    ),
    "JumpReluAutoEncoder": (
        ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
        lambda t: {
            "W_enc": t["W_enc"],
            "b_enc": t["b_enc"],
            "W_dec": t["W_dec"],
            "b_dec": t["b_dec"],
            "threshold": t["threshold"],
            "architecture": "jumprelu",
            "apply_b_dec_to_input": False,
        },
    ),
    "AutoEncoderTopK": (
        ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"),
        lambda t: {**_linear(t), "b_enc": t["encoder.bias"], "b_dec": t["b_dec"], "architecture": "topk"},
    ),
    "BatchTopKSAE": (
        ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "threshold"),
        lambda t: {
            **_linear(t),
            "b_enc": t["encoder.bias"],
            "b_dec": t["b_dec"],
            "threshold": _threshold(t),
            "architecture": "jumprelu",
        },
    ),
    "MatryoshkaBatchTopKSAE": (
        ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
        lambda t: {
            "W_enc": t["W_enc"],
            "b_enc": t["b_enc"],
            "W_dec": t["W_dec"],
            "b_dec": t["b_dec"],
            "threshold": _threshold(t),
            "architecture": "jumprelu",
        },
    ),
}


def read_directory(path: Path) -> SAE:
    """The SAE in a dictionary_learning directory (ae.pt and config.json), by its trainer's dict_class."""
    cfg_file = path / CONFIG
    if not cfg_file.exists():
        raise SAEFormatError(f"{path}: {WEIGHTS} without {CONFIG} (dictionary_learning writes both)")
    trainer = read_json_object(cfg_file).get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise SAEFormatError(f"{cfg_file}: expected a 'trainer' object with 'dict_class'")
    dict_class = trainer["dict_class"]
    if dict_class not in CLASSES:
        raise SAEFormatError(
            f"{cfg_file}: trainer.dict_class {dict_class!r} is not supported (expected one of {', '.join(CLASSES)})"
        )
    file = path / WEIGHTS
    tensors = read_torch(file)
    names, mapping = CLASSES[dict_class]
    require(tensors, names, file)
    fields = mapping(tensors)
    k = None
    if fields["architecture"] == "topk":
        k = whole_number(tensors["k"], "k", file)
        if trainer.get("k") is not None and whole_number(trainer["k"], "trainer.k", cfg_file) != k:
            raise SAEFormatError(f"{cfg_file}: trainer.k={trainer['k']} but {WEIGHTS} holds k={k}")
    return SAE(
        **fields,
        k=k,
        hook_name=_hook(trainer, cfg_file),
        model_name=str(trainer["lm_name"]).split("/")[-1] if trainer.get("lm_name") else None,
        metadata={"dict_class": dict_class, **{k: v for k, v in trainer.items() if not isinstance(v, dict | list)}},
        path=path,
    )


def _hook(trainer: dict[str, Any], cfg_file: Path) -> str | None:
    """dictionary_learning records the layer; its SAEBench suites read the residual stream after it."""
    layer = trainer.get("layer")
    submodule = str(trainer.get("submodule_name") or "resid_post")
    if layer is None or "resid_post" not in submodule:
        return None
    index = whole_number(layer, "trainer.layer", cfg_file)
    if index is None or index < 0:
        raise SAEFormatError(f"{cfg_file}: trainer.layer must be a layer index (0 or more), got {layer!r}")
    return f"blocks.{index}.hook_resid_post"
