"""EleutherAI sparsify directories (`cfg.json` + `sae.safetensors`) -> `SAE`.

sparsify's `SparseCoder`: ReLU of `x W_enc^T + b`, then top-k (or GroupMax: the
largest latent of each of k equal groups); decode with `W_dec` + `b_dec`. An
autoencoder subtracts `b_dec` from its input first, a transcoder
(`transcode`) does not, and a skip connection adds `x @ W_skip^T` to the output.
"""

from __future__ import annotations

from pathlib import Path

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.formats.tensors import (
    read_json_object,
    read_safetensors,
    require,
    whole_number,
)
from sae_acceptance.sources.sae import SAE

WEIGHTS = "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")


def read_directory(path: Path) -> SAE:
    """The TopK SAE in an EleutherAI sparsify directory (cfg.json and sae.safetensors)."""
    cfg_file = path / "cfg.json"
    cfg = read_json_object(cfg_file)
    file = path / WEIGHTS
    tensors = read_safetensors(file)
    require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), file)
    if "k" not in cfg:
        raise SAEFormatError(f"{cfg_file}: sparsify config without 'k'")
    activation = cfg.get("activation", "topk")
    if activation not in ACTIVATIONS:
        raise SAEFormatError(f"{cfg_file}: activation {activation!r} is not supported (expected topk or groupmax)")
    if cfg.get("signed"):
        raise SAEFormatError(f"{cfg_file}: signed sparse coders are not supported")
    skip = bool(cfg.get("skip_connection"))
    if skip:
        require(tensors, ("W_skip",), file)
    transcode = bool(cfg.get("transcode"))
    return SAE(
        W_enc=tensors["encoder.weight"].T.contiguous(),
        b_enc=tensors["encoder.bias"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        architecture=activation,
        k=whole_number(cfg["k"], "k", cfg_file),
        apply_b_dec_to_input=not transcode,
        metadata=dict(cfg),
        path=path,
        W_skip=tensors["W_skip"] if skip else None,
        transcoder=transcode,
    )
