"""Per-latent statistics of an SAE's weights (no model, no data): SAEBench's weight-based metrics.

The maximum cosine of each latent's decoder (or encoder) direction to any other
latent's flags duplicated latents; the encoder's norms and biases and the cosine
between a latent's encoder and decoder directions complete SAEBench's per-latent
details. Computed on the SAE's own device, a block of latents at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from sae_acceptance.sources.sae import SAE

BLOCK = 4096  # latents compared at once: a [BLOCK, d_sae] block of cosines in memory


def max_cosines(directions: torch.Tensor) -> np.ndarray:
    """[F, d] directions -> [F] the signed maximum cosine of each to any other (NaN when F = 1);
    a zero direction has cosine 0 with every other."""
    unit = torch.nn.functional.normalize(directions.float(), dim=-1)
    count = unit.shape[0]
    out = torch.empty(count, dtype=torch.float32, device=unit.device)
    for start in range(0, count, BLOCK):
        sims = unit[start : start + BLOCK] @ unit.T
        rows = torch.arange(sims.shape[0], device=unit.device)
        sims[rows, rows + start] = -torch.inf
        out[start : start + BLOCK] = sims.max(dim=-1).values
    values = out.cpu().numpy().astype(np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def latent_weights(sae: SAE) -> dict[str, np.ndarray]:
    """Each latent's `max_decoder_cosine`, `max_encoder_cosine`, `encoder_norm`, `encoder_bias`
    (the gate bias of a gated SAE's magnitude path: `b_mag`) and `encoder_decoder_cosine` (NaN
    for a transcoder, whose encoder and decoder live in different spaces)."""
    with torch.no_grad():
        encoder = sae.W_enc.T  # [d_sae, d_in]: latent i's encoder direction
        decoder = sae.W_dec  # [d_sae, d_out]
        bias = sae.b_mag if sae.architecture == "gated" and sae.b_mag is not None else sae.b_enc
        if encoder.shape[1] == decoder.shape[1]:
            pair = torch.nn.functional.cosine_similarity(encoder.float(), decoder.float(), dim=-1)
            encoder_decoder = pair.cpu().numpy().astype(np.float64)
        else:
            encoder_decoder = np.full(sae.d_sae, np.nan)
        return {
            "max_decoder_cosine": max_cosines(decoder),
            "max_encoder_cosine": max_cosines(encoder),
            "encoder_norm": encoder.float().norm(dim=-1).cpu().numpy().astype(np.float64),
            "encoder_bias": bias.float().cpu().numpy().astype(np.float64),
            "encoder_decoder_cosine": encoder_decoder,
        }
