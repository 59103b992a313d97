"""SAELens configs (v6 and the flat pre-6.0 layout) and state dicts -> `SAE`.

The same mapping serves a SAELens directory on disk and the (config, state
dict) pair that SAELens's converters return for releases stored in other
formats (`converters.py`), so every SAELens architecture is read in one place.
A key the config leaves out means what SAELens makes of it (`SAELENS_DEFAULTS`).
Where the config names the Hugging Face points its trainer read and wrote
(`hf_hook_name`, `hf_hook_name_out`; Gemma Scope 2's `hf_hook_point_in/out`),
the SAE is placed there rather than at SAELens's TransformerLens names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.formats.tensors import (
    read_json_object,
    read_safetensors,
    require,
    whole_number,
)
from sae_acceptance.sources.sae import SAE, fold_decoder_norm_rescale, fold_input_scale

WEIGHTS = "sae_weights.safetensors"

# SAELens's dataclass defaults (`SAEConfig`, `TopKSAEConfig`) for keys a config may leave out;
# tests/test_sae_defaults.py holds them against the installed SAELens.
SAELENS_DEFAULTS: dict[str, Any] = {
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "dtype": "float32",
    "k": 100,
    "rescale_acts_by_decoder_norm": False,
}

# SAELens architecture -> (encoder rule, transcoder?)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "standard": ("standard", False),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "gated": ("gated", False),
    "transcoder": ("standard", True),
    "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
REFUSED_ARCHITECTURES = {
    "temporal": "its latents depend on earlier tokens through attention layers, not a per-token encoder",
    "matching_pursuit": "its encoder is an iterative residual pursuit, not a single-layer encoder",
    "abstopk": "its top-k on absolute pre-activations keeps negative latents, which the project does not model",
}


def read_directory(path: Path) -> SAE:
    """The SAE in a sae-lens directory (cfg.json and its safetensors)."""
    cfg_file = path / "cfg.json"
    cfg = read_json_object(cfg_file)
    file = path / WEIGHTS
    return from_config(cfg, read_safetensors(file), where=cfg_file, weights=file, path=path)


def _head_index(value: Any, where: Path | str) -> int | None:
    """The attention head an SAE reads, a whole number from 0 (None: every head)."""
    index = whole_number(value, "hook_head_index", where)
    if index is not None and index < 0:
        raise SAEFormatError(f"{where}: hook_head_index must be 0 or more, got {index}")
    return index


def setting(cfg: dict[str, Any], key: str) -> Any:
    """`cfg[key]`, or SAELens's default where the config leaves it out (or null)."""
    value = cfg.get(key)
    return SAELENS_DEFAULTS[key] if value is None else value


def from_config(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    where: Path | str,
    weights: Path | str | None = None,
    path: Path | None = None,
    norm_scaling_factor: float | None = None,
    dtype: torch.dtype | None = None,
) -> SAE:
    """One SAELens config and its tensors -> `SAE`; `where`/`weights` name the config and tensor sources in errors.

    Folds happen in the tensors' own dtype and the result is cast last, to `dtype` (else the
    config's), in SAELens's order: a converter called with the asked dtype gives SAELens's tensors."""
    weights = weights if weights is not None else where
    legacy = not (cfg.get("metadata") or {}).get("sae_lens_version") and not cfg.get("sae_lens_version")
    meta = {**cfg, **(cfg.get("metadata") or {})} if legacy else dict(cfg.get("metadata") or {})
    meta.pop("metadata", None)
    name = _architecture(cfg, legacy, where)
    if name in REFUSED_ARCHITECTURES:
        raise SAEFormatError(f"{where}: architecture {name!r} is not supported ({REFUSED_ARCHITECTURES[name]})")
    if name not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise SAEFormatError(f"{where}: architecture {name!r} is not supported (expected one of {known})")
    rule, transcoder = ARCHITECTURES[name]
    tensors = _fold_finetuning_scale(dict(tensors), weights)
    if "log_threshold" in tensors and "threshold" not in tensors:  # older SAELens JumpReLU checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if rule == "gated":
        require(tensors, ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"), weights)
        tensors["b_enc"] = tensors["b_gate"]
    require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), weights)
    threshold = tensors.get("threshold")
    if rule == "jumprelu" and threshold is not None and threshold.ndim == 0:
        threshold = threshold.expand(tensors["W_enc"].shape[-1]).clone()
    first = lambda *keys: next((v for k in keys if (v := cfg.get(k, meta.get(k))) is not None), None)  # noqa: E731
    norm = _normalization(setting(cfg, "normalize_activations"), norm_scaling_factor, where)
    hf_in = first("hf_hook_name", "hf_hook_point_in")
    hf_out = first("hf_hook_name_out", "hf_hook_point_out") if transcoder else None
    k = whole_number(_k(cfg) if legacy else setting(cfg, "k"), "k", where) if rule == "topk" else None
    if k is not None and cfg.get("k") is None and not legacy and k > tensors["W_enc"].shape[-1]:
        raise SAEFormatError(
            f"{where}: topk config without k, and SAELens's default k = {k} is above d_sae = {tensors['W_enc'].shape[-1]}"
        )
    sae = SAE(
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        architecture=rule,
        k=k,
        threshold=threshold if rule == "jumprelu" else None,
        apply_b_dec_to_input=False if transcoder else bool(setting(cfg, "apply_b_dec_to_input")),
        hook_name=hf_in or first("hook_name", "hook_point"),
        model_name=first("model_name"),
        metadata=meta,
        path=path,
        b_mag=tensors.get("b_mag") if rule == "gated" else None,
        r_mag=tensors.get("r_mag") if rule == "gated" else None,
        W_skip=tensors.get("W_skip") if name.endswith("skip_transcoder") else None,
        hook_name_out=hf_out or first("hook_name_out"),
        hook_head_index=_head_index(first("hook_head_index", "hook_point_head_index"), where),
        normalize_activations=norm if isinstance(norm, str) else "none",
        transcoder=transcoder,
    )
    _check_widths(cfg, sae, where)
    if name.endswith("skip_transcoder") and sae.W_skip is None:
        raise SAEFormatError(f"{weights}: {name} without a W_skip tensor")
    if isinstance(norm, float):
        sae = fold_input_scale(sae, norm)
    if rule == "topk" and setting(cfg, "rescale_acts_by_decoder_norm"):
        sae = fold_decoder_norm_rescale(sae)
    if dtype is None:
        named = getattr(torch, str(setting(cfg, "dtype")).removeprefix("torch."), None)
        dtype = named if isinstance(named, torch.dtype) else None
        if dtype is not None and not dtype.is_floating_point:
            raise SAEFormatError(f"{where}: dtype {setting(cfg, 'dtype')!r} is not a floating-point dtype")
    return sae.to(dtype=dtype)


def _check_widths(cfg: dict[str, Any], sae: SAE, where: Path | str) -> None:
    """cfg.json's d_in / d_sae / d_out against the weights: an edited or mismatched config is
    refused rather than evaluated as something it does not describe."""
    for key, actual in (("d_in", sae.d_in), ("d_sae", sae.d_sae), ("d_out", getattr(sae, "d_out", None))):
        stated = cfg.get(key)
        if stated is not None and actual is not None and whole_number(stated, key, where) != actual:
            raise SAEFormatError(f"{where}: {key} = {stated}, but the weights are {actual} wide")


def _architecture(cfg: dict[str, Any], legacy: bool, where: Path | str) -> str:
    name = str(cfg.get("architecture") or "standard")
    if not legacy:
        return name
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if act == "topk" or name == "topk":
        if _k(cfg) is None:
            raise SAEFormatError(f"{where}: topk activation without activation_fn_kwargs.k")
        return "topk"
    if act != "relu" and name == "standard":
        raise SAEFormatError(f"{where}: cannot tell the architecture (architecture={name!r}, activation_fn={act!r})")
    return name


def _k(cfg: dict[str, Any]) -> Any:
    return cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))


def _normalization(mode: Any, factor: float | None, where: Path | str) -> str | float:
    """A run-time mode the SAE applies itself, or the constant input scale to fold into the weights."""
    if mode in (None, False, "none"):
        return "none"
    if mode is True or mode == "expected_average_only_in":
        if factor is None:
            raise SAEFormatError(
                f"{where}: normalize_activations='expected_average_only_in' needs the activation scaling "
                "factor it was trained with, which is not recorded here (fold it into the weights and save with 'none')"
            )
        return float(factor)
    if mode in ("constant_norm_rescale", "layer_norm"):
        return str(mode)
    raise SAEFormatError(
        f"{where}: normalize_activations={mode!r} is not supported "
        "(expected none, expected_average_only_in with its factor, constant_norm_rescale or layer_norm)"
    )


def _fold_finetuning_scale(tensors: dict[str, torch.Tensor], where: Path | str) -> dict[str, torch.Tensor]:
    """A per-latent scale applied before decoding (`scaling_factor`/`finetuning_scaling_factor`) goes into W_dec."""
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        scale = tensors.pop(key, None)
        if scale is None or bool((scale == 1).all()):
            continue
        if "W_dec" not in tensors or scale.shape != tensors["W_dec"].shape[:1]:
            raise SAEFormatError(f"{where}: tensor {key} has shape {tuple(scale.shape)}, expected [d_sae]")
        tensors["W_dec"] = tensors["W_dec"] * scale[:, None]
    return tensors


def saelens_architecture(sae: SAE) -> str:
    """The SAELens architecture name that `sae` is written as (`save_sae`)."""
    if sae.architecture == "groupmax":
        raise SAEFormatError(
            f"{sae._where()}: groupmax (sparsify) has no SAELens architecture; keep it in sparsify layout"
        )
    if not sae.transcoder:
        return sae.architecture
    if sae.architecture not in ("standard", "jumprelu"):
        raise SAEFormatError(f"{sae._where()}: SAELens has no {sae.architecture} transcoder")
    prefix = "jumprelu_" if sae.architecture == "jumprelu" else ""
    return f"{prefix}{'skip_' if sae.W_skip is not None else ''}transcoder"


def state_dict(sae: SAE) -> dict[str, torch.Tensor]:
    """Tensors under SAELens's names."""
    tensors = dict(sae.tensors())
    if sae.architecture == "gated":
        tensors["b_gate"] = tensors.pop("b_enc")
    return tensors
