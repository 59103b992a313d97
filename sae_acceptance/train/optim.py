"""The trainer's optimisers and learning-rate schedule.

`adam`: fused Adam under linear warm-up and linear decay to zero. `signum`: sign
descent under schedule-free averaging (sparsify's default for SAEs), warm-up and
no decay, since the average takes the schedule's place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from schedulefree import ScheduleFreeWrapper

from sae_acceptance.train.settings import TrainSettings

SCHEDULE_FREE_MOMENTUM = 0.95


class SignSGD(torch.optim.Optimizer):
    """Sign descent: each weight moves by the learning rate against its gradient's sign.

    Steepest descent in the max norm (Bernstein et al. 2018).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # noqa: D102  # torch overloads step for a closure this one refuses
        if closure is not None:
            raise ValueError("SignSGD.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def make_optimiser(parameters: list[torch.nn.Parameter], cfg: TrainSettings, lr: float) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over `parameters`, ready to step."""
    if cfg.optimizer == "adam":
        fused = parameters[0].device.type in ("cpu", "cuda")  # one kernel for all parameters
        return torch.optim.Adam(parameters, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None)
    optimiser = ScheduleFreeWrapper(SignSGD(parameters, lr=lr), momentum=SCHEDULE_FREE_MOMENTUM)
    optimiser.train()
    return optimiser


def lr_factor(step: int, tokens_seen: int, total_tokens: int, cfg: TrainSettings) -> float:
    """Linear warm-up over `warmup_steps` steps; linear decay to 0 over the last `cfg.decay()` tokens."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    decay_tokens = cfg.decay() * total_tokens
    left = total_tokens - tokens_seen
    decay = 1.0 if decay_tokens <= 0 or left >= decay_tokens else max(0.0, left / decay_tokens)
    return warm * decay
