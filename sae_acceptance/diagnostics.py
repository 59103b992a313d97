"""Why an SAE fails: what the engine's diagnostic passes keep, batch by batch.

The passes themselves run in `engine` (the only place the model runs). Here are
their switches and the state each keeps: the seeded random directions of the
error-versus-random control, the worst contexts, and the error's propagation
through the later blocks. Nothing here calls a model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

WINDOW = 24  # token ids kept before (and at) a worst context's position


@dataclass(frozen=True)
class Diagnostics:
    """Which diagnostic passes and sums an evaluation adds, per SAE (`[eval] diagnostics`).

    `random`: a patched pass with the error turned to a random direction of the same norm;
    `gradient`: the loss gradient at the replaced activation (one backward per hook);
    `worst`: the `worst_n` positions the reconstruction hurts most; `propagation`: the error at
    every later block output; `saebench`: SAEBench's core sums. `seed` seeds the random pass.
    """

    random: bool
    gradient: bool
    worst_n: int
    propagation: bool
    saebench: bool
    seed: int

    @classmethod
    def off(cls) -> Diagnostics:
        """No diagnostics: only the gate's own metrics."""
        return cls(random=False, gradient=False, worst_n=0, propagation=False, saebench=False, seed=0)


def random_generator(seed: int, name: str) -> torch.Generator:
    """The random directions of SAE `name`: seeded by the eval seed and the SAE's name alone, so
    they do not depend on which other SAEs are evaluated, in what order, or on which machine."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_unit(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Unit vectors drawn uniformly on the sphere (normalised Gaussians), [..., d], float32."""
    u = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (u / u.norm(dim=-1, keepdim=True).clamp(min=1e-30)).to(device)


@dataclass
class WorstContexts:
    """The `n` counted loss positions with the largest per-token CE increase seen so far."""

    n: int
    increase: np.ndarray = field(default_factory=lambda: np.empty(0))
    where: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))  # (sequence, position)
    ce: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # (ce_orig, ce_recon)

    def update(self, first_sequence: int, ce_orig: torch.Tensor, ce_recon: torch.Tensor, counted: torch.Tensor) -> None:
        """Fold in one batch: per-position CEs [B, T-1] and the counted loss positions."""
        if self.n <= 0:
            return
        increase = torch.where(counted, (ce_recon - ce_orig).double(), -torch.inf).flatten()
        k = min(self.n, int(counted.sum()))
        if k == 0:
            return
        top = torch.topk(increase, k).indices
        width = ce_orig.shape[1]
        rows, cols = (top // width).cpu().numpy(), (top % width).cpu().numpy()
        self.increase = np.concatenate([self.increase, increase[top].cpu().numpy()])
        self.where = np.concatenate([self.where, np.stack([rows + first_sequence, cols], axis=1)])
        pair = torch.stack([ce_orig.flatten()[top], ce_recon.flatten()[top]], dim=1).double().cpu().numpy()
        self.ce = np.concatenate([self.ce, pair])
        order = np.lexsort((self.where[:, 1], self.where[:, 0], -self.increase))[: self.n]  # ties: earliest first
        self.increase, self.where, self.ce = self.increase[order], self.where[order], self.ce[order]

    def records(self, tokens: torch.Tensor) -> list[dict[str, Any]]:
        """Each worst context as plain data: where it is, its target, both CEs, and the token ids
        of the preceding window (up to `WINDOW`, ending at the position)."""
        out = []
        for (sequence, position), increase, (ce_orig, ce_recon) in zip(self.where, self.increase, self.ce, strict=True):
            row = tokens[int(sequence)]
            start = max(0, int(position) - WINDOW + 1)
            out.append(
                {
                    "sequence": int(sequence),
                    "position": int(position),
                    "target": int(row[position + 1]),
                    "ce_orig": float(ce_orig),
                    "ce_recon": float(ce_recon),
                    "increase": float(increase),
                    "window": [int(t) for t in row[start : position + 1]],
                }
            )
        return out
