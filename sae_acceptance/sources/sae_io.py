"""Load an SAE from wherever it is named (a directory, ``hf://``, ``sae-lens://``); save one in SAELens's layout.

A directory keeps the SAE's own dtype unless `dtype` is given; a SAELens release
comes out in `dtype`, float32 by default, as `SAE.from_pretrained` gives it. Saving
writes the SAELens v6 layout, so that SAELens and this loader both read what we train.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.io import write_atomic
from sae_acceptance.sources.formats import saelens
from sae_acceptance.sources.formats.converters import load_release
from sae_acceptance.sources.formats.layouts import read_directory
from sae_acceptance.sources.hub import locate_sae
from sae_acceptance.sources.hub_calls import quiet_hub, say_hub_wait
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.spec import SAELENS_PREFIX, is_remote

SAELENS_VERSION_WRITTEN = "6.54.12"


def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SAE:
    """Load an SAE: a local directory in any layout `formats/layouts.py` reads, an
    ``hf://owner/repo[@revision]/folder`` (fetched into the hub cache first), or a
    ``sae-lens://release/sae_id`` (SAELens's converter for that release, called with `dtype`).
    `dtype=None` keeps a directory's own dtype and reads a release in float32."""
    text = str(path)
    if is_remote(text):
        say_hub_wait(text)
    if text.startswith(SAELENS_PREFIX):
        with quiet_hub():
            sae = load_release(text, dtype)
    elif is_remote(text):
        with quiet_hub():
            local = locate_sae(text)  # its errors name the spec already
        try:
            sae = read_directory(local)
        except SAEFormatError as err:
            raise SAEFormatError(f"{text}: {err}") from None
    else:
        sae = read_directory(Path(path))
    return sae.to(device=device, dtype=dtype)


def save_sae(sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` as a SAELens v6 directory (cfg.json + sae_weights.safetensors)."""
    architecture = saelens.saelens_architecture(sae)  # refuses what SAELens cannot express, before writing
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {**sae.metadata, **(metadata or {})}
    meta.setdefault("sae_lens_version", SAELENS_VERSION_WRITTEN)
    meta.setdefault("sae_lens_training_version", SAELENS_VERSION_WRITTEN)
    meta["hook_name"] = sae.hook_name or meta.get("hook_name")
    meta["model_name"] = sae.model_name or meta.get("model_name")
    meta["hook_head_index"] = sae.hook_head_index
    if sae.transcoder:
        meta["hook_name_out"] = sae.hook_name_out
    meta.setdefault("prepend_bos", False)
    meta.setdefault("model_from_pretrained_kwargs", {"center_writing_weights": False})
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations,
        "reshape_activations": "none",
        "metadata": meta,
    }
    if sae.transcoder:
        cfg["d_out"] = sae.d_out
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    tensors = {name: t.detach().cpu().contiguous() for name, t in saelens.state_dict(sae).items()}
    # Each file atomic, cfg.json last: a directory with a cfg.json holds whole weights (the
    # sweep cache reads a present cfg.json as a finished SAE).
    write_atomic(path / saelens.WEIGHTS, save_safetensors(tensors))
    write_atomic(path / "cfg.json", json.dumps(cfg, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
