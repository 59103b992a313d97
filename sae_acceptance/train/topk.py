"""The TopK SAE trainer (Gao et al. 2024), and a k-grid trainer that shares one data pass.

Recipe: ReLU of the top-k pre-activations of (x − b_dec) W_enc + b_enc; decoder
rows kept at unit norm (the gradient's component along each row is removed
before a step, rows are renormalised after); encoder initialised as the
decoder's transpose; b_dec initialised at the geometric median of the first
batch; an AuxK loss in which the dead latents model the residual error; Adam
with a learning rate scaled with 1/sqrt(d_sae), linear warm-up and a linear
decay over the last fifth of training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_acceptance.sources.sae import SAE

TRAINER_VERSION = "topk-1"


@dataclass(frozen=True)
class TrainConfig:
    k: int = 32
    expansion_factor: int = 32
    d_sae: int | None = None
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 2**14)
    batch_size: int = 4096
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    auxk_alpha: float = 1 / 32
    auxk_k: int | None = None  # None: d_in // 2
    dead_tokens: int = 10_000_000  # tokens without firing before a latent counts as dead
    seed: int = 0

    def latents(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def learning_rate(self, d_in: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.latents(d_in) / 2**14)


def geometric_median(x: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Weiszfeld's iterations: a centre for b_dec that outliers do not drag."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp(min=1e-8)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


class TopKTrainee(torch.nn.Module):
    """The SAE being trained, with its dead-latent bookkeeping."""

    def __init__(self, d_in: int, k: int, cfg: TrainConfig):
        super().__init__()
        d_sae = cfg.latents(d_in)
        generator = torch.Generator().manual_seed(cfg.seed)
        w_dec = F.normalize(torch.randn(d_sae, d_in, generator=generator), dim=1)
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.k, self.auxk_k = k, cfg.auxk_k or d_in // 2
        self.register_buffer("since_fired", torch.zeros(d_sae, dtype=torch.long))

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def loss(self, x: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, FVU of the batch); updates the dead-latent counters."""
        pre = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        recon = self.decode(values, indices)
        error = x - recon
        variance = (x - x.mean(0)).pow(2).sum()
        fvu = error.pow(2).sum() / variance
        with torch.no_grad():
            fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
            fired[indices[values > 0]] = True
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
        dead = self.since_fired > cfg.dead_tokens
        total = fvu
        if cfg.auxk_alpha > 0 and dead.any():
            aux_k = min(self.auxk_k, int(dead.sum()))
            dead_pre = pre.masked_fill(~dead, 0.0)
            aux_values, aux_indices = dead_pre.topk(aux_k, dim=-1, sorted=False)
            aux_recon = F.embedding_bag(aux_indices, self.W_dec, per_sample_weights=aux_values, mode="sum")
            residual = error.detach()
            aux = (aux_recon - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp(min=1e-12)
            total = total + cfg.auxk_alpha * aux.nan_to_num(0.0)
        return total, fvu.detach()

    @torch.no_grad()
    def project_decoder_gradient(self) -> None:
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def renormalise_decoder(self) -> None:
        self.W_dec.data = F.normalize(self.W_dec.data, dim=1)

    def dead_fraction(self, cfg: TrainConfig) -> float:
        return float((self.since_fired > cfg.dead_tokens).float().mean())

    def to_sae(self, metadata: dict) -> SAE:
        return SAE(
            W_enc=self.W_enc.detach().clone(),
            b_enc=self.b_enc.detach().clone(),
            W_dec=self.W_dec.detach().clone(),
            b_dec=self.b_dec.detach().clone(),
            architecture="topk",
            k=self.k,
            metadata={**metadata, "k": self.k, "trainer_version": TRAINER_VERSION},
        )


def _schedule(step: int, total_steps: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = int(total_steps * (1 - cfg.decay_fraction))
    decay = 1.0 if step < decay_start else max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return warm * decay


def train_topk_grid(
    batches: Iterable[torch.Tensor],
    d_in: int,
    ks: list[int],
    cfg: TrainConfig,
    total_tokens: int,
    progress: bool = True,
    metadata: dict | None = None,
) -> dict[int, SAE]:
    """Train one TopK SAE per k from one pass over `batches` ([n, d_in] each).

    Every SAE sees exactly the batches it would see alone (same seed, same
    stream), so the grid equals separate runs; the activations are produced once.
    """
    trainees = {k: TopKTrainee(d_in, k, cfg) for k in ks}
    lr = cfg.learning_rate(d_in)
    optimisers = {k: torch.optim.Adam(t.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10) for k, t in trainees.items()}
    total_steps = max(1, total_tokens // cfg.batch_size)
    seen, step = 0, 0
    bar = tqdm(total=total_tokens, desc=f"train topk k={ks}", unit="tok", unit_scale=True, disable=not progress)
    for batch in batches:
        x = batch.float()
        if x.shape[0] < 2:  # no variance to normalise by
            continue
        if step == 0:
            median = geometric_median(x)
            for t in trainees.values():
                t.b_dec.data.copy_(median)
        scale = _schedule(step, total_steps, cfg)
        fvus = {}
        for k, trainee in trainees.items():
            optimiser = optimisers[k]
            for group in optimiser.param_groups:
                group["lr"] = lr * scale
            loss, fvus[k] = trainee.loss(x, cfg)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            trainee.project_decoder_gradient()
            optimiser.step()
            trainee.renormalise_decoder()
        seen += x.shape[0]
        step += 1
        bar.update(x.shape[0])
        if step % 20 == 0:
            k_max = max(ks)
            bar.set_postfix(fvu=f"{float(fvus[k_max]):.3f}", dead=f"{trainees[k_max].dead_fraction(cfg):.2f}")
        if seen >= total_tokens:
            break
    bar.close()
    meta = {**(metadata or {}), "training_tokens": seen, "seed": cfg.seed}
    return {k: t.to_sae(meta) for k, t in trainees.items()}


def train_topk(batches: Iterable[torch.Tensor], d_in: int, cfg: TrainConfig, total_tokens: int,
               progress: bool = True, metadata: dict | None = None) -> SAE:
    """One SAE: the grid trainer with a grid of one."""
    return train_topk_grid(batches, d_in, [cfg.k], cfg, total_tokens, progress, metadata)[cfg.k]
