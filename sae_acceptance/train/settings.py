"""The TopK trainer's settings: every option, its default and its check, in one model.

`TrainSettings` is what the trainer reads, what a sweep profile's `[train]`
table holds, and what the `train` command's flags are made from (each field
has a description and a scalar type; `adam_betas` is a pair).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import Field

from sae_acceptance.config import StrictModel

Optimizer = Literal["adam", "signum"]
OPTIMISERS: tuple[str, ...] = get_args(Optimizer)

# Learning rates at d_sae = 2**14, scaled by 1/sqrt(d_sae / 2**14) for other widths.
BASE_LR: dict[str, float] = {"adam": 2e-4, "signum": 5e-3}
# Share of the training tokens over which the learning rate decays to zero.
BASE_DECAY: dict[str, float] = {"adam": 0.2, "signum": 0.0}


class TrainSettings(StrictModel):
    """How a TopK SAE trains. Optional fields left unset take a value derived from the others."""

    k: int = Field(32, gt=0, description="active latents per token (a k grid trains one SAE per k)")
    expansion_factor: int = Field(32, gt=0, description="d_sae = expansion_factor * d_in, unless d_sae is given")
    d_sae: int | None = Field(None, gt=0, description="number of latents (default: expansion_factor * d_in)")
    lr: float | None = Field(
        None,
        gt=0,
        description="learning rate (default: "
        + " or ".join(f"{lr:g} ({name})" for name, lr in BASE_LR.items())
        + " / sqrt(d_sae / 2^14))",
    )
    batch_size: int = Field(4096, gt=0, description="tokens per step")
    warmup_steps: int = Field(100, ge=0, description="steps of linear learning-rate warm-up")
    decay_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="linear decay to zero over this last share of the tokens (default: "
        + " or ".join(f"{d:g} ({name})" for name, d in BASE_DECAY.items())
        + ")",
    )
    auxk_alpha: float = Field(1 / 32, ge=0, description="weight of the AuxK loss on dead latents")
    auxk_k: int | None = Field(None, gt=0, description="dead latents in the AuxK loss (default: d_in / 2)")
    dead_tokens: int = Field(10_000_000, ge=0, description="tokens without firing before a latent counts as dead")
    seed: int = Field(0, description="seed of the decoder's initialisation and of the batch shuffle")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's beta1 and beta2")
    adam_eps: float = Field(6.25e-10, gt=0, description="Adam's epsilon")
    init_tokens: int = Field(32_768, gt=0, description="tokens of the first batches that set b_dec and the loss scale")
    median_iterations: int = Field(10, ge=0, description="Weiszfeld iterations for b_dec's geometric median")
    optimizer: Optimizer = Field(
        "adam", description="adam: Adam with warm-up and decay; signum: sign descent, schedule-free"
    )

    def latents(self, d_in: int) -> int:
        """d_sae for an input of width `d_in`: `d_sae` if set, else `expansion_factor` x d_in."""
        return self.d_sae or self.expansion_factor * d_in

    def learning_rate(self, d_in: int) -> float:
        """`lr` if set, else the optimiser's base rate scaled by 1/sqrt(d_sae / 2^14)."""
        if self.lr is not None:
            return self.lr
        return BASE_LR[self.optimizer] / math.sqrt(self.latents(d_in) / 2**14)

    def decay(self) -> float:
        """Fraction of the tokens over which the learning rate decays to 0 (the optimiser's default if unset)."""
        return BASE_DECAY[self.optimizer] if self.decay_fraction is None else self.decay_fraction

    def aux_latents(self, d_in: int) -> int:
        """Dead latents the AuxK loss uses: `auxk_k` if set, else d_in / 2."""
        return self.auxk_k or max(1, d_in // 2)
