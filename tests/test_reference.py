"""The embedded reference model: its canyon is in the geometry, not in the model's behaviour.

Block 1 writes a large, token-dependent multiple of the all-ones vector into the residual
stream. Every LayerNorm subtracts the mean over d_model, so the model cannot read that
direction: removing it from the residual changes no logit, while it holds most of the
residual's variance (the collapsed participation ratio the gate warns about).
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import REPO

from sae_acceptance.sources.model import load_model


def test_the_canyon_direction_is_invisible_to_the_outputs_and_dominates_the_variance():
    model = load_model(REPO / "reference" / "model", device="cpu")
    tokens = torch.from_numpy(np.load(REPO / "reference" / "tokens.npy")[:16].astype(np.int64))

    def remove_ones_direction(resid, hook):
        return resid - resid.mean(-1, keepdim=True)

    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
        hooks = [(f"blocks.{layer}.hook_resid_post", remove_ones_direction) for layer in range(1, model.cfg.n_layers)]
        without = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert float((logits - without).abs().max()) < 1e-4  # measured 3e-5: float32 rounding of a large component
    ones = torch.ones(model.cfg.d_model) / model.cfg.d_model**0.5
    for layer in range(model.cfg.n_layers):
        act = cache[f"blocks.{layer}.hook_resid_post"].reshape(-1, model.cfg.d_model).double()
        centred = act - act.mean(0)
        share = float((centred @ ones.double()).pow(2).sum() / centred.pow(2).sum())
        if layer == 0:
            assert share < 0.1  # before the canyon block: an ordinary direction
        else:
            assert share > 0.95  # from block 1 on: nearly all of the variance
