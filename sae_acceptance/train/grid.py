"""A k grid of TopK SAEs at one hookpoint of a model, trained from tokens and saved in SAELens format.

The one place that wires model, tokens, activation buffer and trainer together:
the `train` command, the sweep and the embedded reference all train this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_acceptance.sources.model import special_token_ids
from sae_acceptance.sources.sae_io import save_sae
from sae_acceptance.sources.tokens import counted_mask
from sae_acceptance.train.activations import ActivationBuffer
from sae_acceptance.train.settings import TrainSettings
from sae_acceptance.train.topk import train_topk_grid

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def train_at_hook(
    model: HookedTransformer,
    model_name: str,
    tokens: torch.Tensor,
    hook: str,
    ks: list[int],
    cfg: TrainSettings,
    out: Mapping[int, Path],
    train_tokens: int | None = None,
    metadata: dict[str, Any] | None = None,
    buffer_tokens: int = 262_144,
    progress: bool = True,
) -> dict[int, Path]:
    """Train one SAE per k in one pass over `tokens` ([n_seq, ctx]) and write SAE k to `out[k]`.

    Special tokens are left out of training, as they are out of every metric.
    Trains on `train_tokens` counted tokens (all of them by default, and never more).
    """
    counted = counted_mask(tokens, special_token_ids(model))
    available = int(counted.sum())
    total = available if train_tokens is None else min(train_tokens, available)
    buffer = ActivationBuffer(
        model,
        tokens,
        hook,
        cfg.batch_size,
        buffer_tokens=buffer_tokens,
        seed=cfg.seed,
        counted=counted,
        total_tokens=total,
    )
    saes = train_topk_grid(
        buffer, model.cfg.d_model, sorted(set(ks)), cfg, total, progress, hook_name=hook, model_name=model_name
    )
    return {k: save_sae(sae, out[k], metadata=metadata) for k, sae in saes.items()}
