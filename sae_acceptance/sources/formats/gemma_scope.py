"""Gemma Scope folders (`params.npz`: w_enc, w_dec, b_enc, b_dec, threshold) -> a JumpReLU `SAE`.

The folder holds no config: the hook comes from the path as Gemma Scope names
it (`gemma-scope-2b-pt-res/layer_12/width_16k/...`), or from the user.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from sae_acceptance.sources.formats.tensors import read_npz, require
from sae_acceptance.sources.sae import SAE

WEIGHTS = "params.npz"


def read_directory(path: Path) -> SAE:
    """The JumpReLU SAE in a Gemma Scope directory (params.npz), its hook read off the path."""
    file = path / WEIGHTS
    tensors = read_npz(file)
    require(tensors, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), file)
    hook, hook_out = hooks_from_path(path)
    sae = SAE(
        W_enc=tensors["w_enc"],
        b_enc=tensors["b_enc"],
        W_dec=tensors["w_dec"],
        b_dec=tensors["b_dec"],
        architecture="jumprelu",
        threshold=tensors["threshold"],
        apply_b_dec_to_input=False,
        hook_name=hook,
        hook_name_out=hook_out,
        metadata={"format": "gemma_scope"},
        path=path,
    )
    if hook == "hook_embed":  # trained on embeddings scaled by sqrt(d_model), which hook_embed is not
        scale = 1 / math.sqrt(sae.d_in)
        sae.W_enc, sae.W_dec = sae.W_enc * scale, sae.W_dec / scale
    return sae


def hooks_from_path(path: Path) -> tuple[str | None, str | None]:
    """(hook, out hook) from Gemma Scope's repository and folder names, where they say."""
    text = "/".join(path.parts[-6:])
    layer = re.search(r"layer_(\d+)", text)
    if "embedding" in text:
        return "hook_embed", None
    if layer is None:
        return None, None
    n = layer.group(1)
    if "transcoders" in text:
        return f"blocks.{n}.ln2.hook_normalized", f"blocks.{n}.hook_mlp_out"
    for marker, hook in (("-res", "hook_resid_post"), ("-mlp", "hook_mlp_out"), ("-att", "attn.hook_z")):
        if marker in text:
            return f"blocks.{n}.{hook}", None
    return None, None
