"""The TopK SAE trainer (Gao et al. 2024), and a k-grid trainer that shares one data pass.

A grid trains one SAE per k from the same batches, so the activations (a model
run) are produced once. A step costs one dense encoder product, written into a
buffer every step and every SAE of a grid reuses; the decoder and the encoder's
backward touch only the selected latents (`_SelectedPreacts`). The recipe, its
defaults and why each was chosen: docs/training.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from schedulefree import ScheduleFreeWrapper
from tqdm.auto import tqdm

from sae_acceptance.sources.sae import SAE
from sae_acceptance.train.optim import lr_factor, make_optimiser
from sae_acceptance.train.settings import TrainSettings

TRAINER_VERSION = "topk-4"
SCALE_TOKENS = 2048  # tokens of the init sample that set the encoder scale


# --------------------------------------------------------------------------- initialisation


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float64 where the device has it."""
    return x.detach().double() if x.device.type != "mps" else x.detach().float()


def geometric_median(x: torch.Tensor, iterations: int = 10, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's iterations from the mean, in float64; the mean where they do not stay finite."""
    xd = _wide(x)
    median = xd.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (xd - median).norm(dim=1).clamp(min=eps)
        candidate = (weights[:, None] * xd).sum(0) / weights.sum()
        if not torch.isfinite(candidate).all():
            break
        median = candidate
    return median.to(x.dtype)


@dataclass(frozen=True)
class _Init:
    b_dec: torch.Tensor  # geometric median of the sample
    variance: float  # per-token variance of the sample: the MSE normaliser
    centred: torch.Tensor  # the first SCALE_TOKENS tokens of the sample minus b_dec


def _initial_statistics(sample: torch.Tensor, cfg: TrainSettings) -> _Init:
    median = geometric_median(sample, cfg.median_iterations)
    wide = _wide(sample)
    variance = float((wide - wide.mean(0)).pow(2).sum(1).mean())
    if not math.isfinite(variance) or variance <= 0:
        variance = 1.0  # constant data: nothing to normalise by
    centred = sample[:SCALE_TOKENS] - median
    return _Init(b_dec=median, variance=variance, centred=centred)


@torch.no_grad()
def encoder_scale(centred: torch.Tensor, enc: torch.Tensor, w_dec: torch.Tensor, k: int, chunk: int = 512) -> float:
    """The factor for the encoder (``b_enc`` = 0) that best fits ``centred`` at init.

    With ``b_enc`` at zero, scaling the encoder by ``s > 0`` scales every
    pre-activation, keeps the top-k choice and scales the reconstruction (minus
    ``b_dec``) by ``s``; so the least-squares ``s`` is ``sum(x . r) / sum(|r|^2)``,
    ``r`` the unscaled reconstruction of the centred inputs ``x``. For a tied
    encoder ``x . r`` is a sum of squared positive pre-activations, so ``s > 0``
    whenever anything fires; where nothing fires (``r = 0``) the scale is 1.
    One chunk's ``[chunk, d_sae]`` pre-activations at a time.
    """
    xr = rr = 0.0
    for xc in centred.split(chunk):
        vals, idx = (xc @ enc.t()).topk(k, dim=1, sorted=False)
        r = _wide(F.embedding_bag(idx, w_dec, per_sample_weights=F.relu(vals), mode="sum"))
        xr += float((_wide(xc) * r).sum())
        rr += float(r.pow(2).sum())
    return xr / rr if rr > 0 else 1.0


# --------------------------------------------------------------------------- the module


class _SelectedPreacts(torch.autograd.Function):
    """The pre-activations ``xc @ enc.T + b_enc`` at given latents, with a sparse backward.

    The values were already computed (densely, without autograd) to choose the
    latents; this only attaches their gradient. The backward touches only the
    selected entries: the input's gradient is a weighted gather of encoder rows,
    the encoder's a weighted gather, per latent, of the tokens that selected it.
    Both are O(n slots d_in), not O(n d_sae d_in).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, xc: torch.Tensor, enc: torch.Tensor, b_enc: torch.Tensor, idx: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(xc, enc, idx)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        xc, enc, idx = ctx.saved_tensors
        grad = grad.contiguous()
        grad_xc = grad_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_xc = F.embedding_bag(idx, enc, per_sample_weights=grad, mode="sum")
        flat = idx.reshape(-1)
        if ctx.needs_input_grad[1]:
            # group the (token, slot) pairs by latent: one weighted bag of tokens per latent
            order = torch.argsort(flat, stable=True)
            tokens = torch.div(order, idx.shape[1], rounding_mode="floor")
            counts = torch.bincount(flat, minlength=enc.shape[0])
            offsets = torch.cumsum(counts, 0) - counts
            grad_enc = F.embedding_bag(tokens, xc, offsets, mode="sum", per_sample_weights=grad.reshape(-1)[order])
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad.new_zeros(enc.shape[0]).index_add_(0, flat, grad.reshape(-1))
        return grad_xc, grad_enc, grad_b_enc, None, None


@dataclass
class StepStats:
    """One training step's losses, for the progress bar and the finite check."""

    loss: torch.Tensor  # detached scalars
    fvu: torch.Tensor
    auxk: torch.Tensor


class TopKTrainee(torch.nn.Module):
    """The TopK SAE being trained, with its dead-latent bookkeeping.

    ``enc`` holds the encoder as rows ``[d_sae, d_in]`` (``W_enc`` transposed) so
    that the sparse backward gathers contiguous rows.
    """

    since_fired: torch.Tensor  # a buffer: tokens since each latent last fired

    def __init__(self, d_in: int, k: int, cfg: TrainSettings, device: torch.device | str = "cpu") -> None:
        super().__init__()
        d_sae = cfg.latents(d_in)
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
        generator = torch.Generator().manual_seed(cfg.seed)
        w_dec = F.normalize(torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32), dim=1)
        self.W_dec = torch.nn.Parameter(w_dec.to(device))
        self.enc = torch.nn.Parameter(w_dec.clone().to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
        self.k = k
        self.auxk_k = min(cfg.aux_latents(d_in), d_sae)
        self.auxk_alpha = cfg.auxk_alpha
        self.dead_tokens = cfg.dead_tokens
        self.variance = 1.0
        self.register_buffer("since_fired", torch.zeros(d_sae, dtype=torch.long, device=device))

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self.W_dec.shape[0]

    def initialise(self, init: _Init) -> None:
        """``b_dec``, the loss normaliser, and the encoder scale for this trainee's k."""
        with torch.no_grad():
            self.b_dec.copy_(init.b_dec.to(self.b_dec))
            centred = init.centred.to(self.enc)
            self.enc.mul_(encoder_scale(centred, self.enc, self.W_dec, self.k))
        self.variance = init.variance

    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired for `dead_tokens` tokens."""
        return self.since_fired > self.dead_tokens

    def dead_fraction(self) -> float:
        """Fraction of the latents that are dead."""
        return float(self.dead_mask().float().mean())

    def step_loss(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, StepStats]:
        """Loss of a batch [n, d_in]; updates the tokens-since-fired counters.

        `scratch` (``[>= n, d_sae]``, contents ignored) receives the dense
        pre-activations, which are not needed after the call. The counters take
        this batch's firing before the dead latents are chosen (as in OpenAI's
        reference implementation), so a latent firing now is not in the AuxK set.
        """
        n = x.shape[0]
        if scratch is not None and (scratch.shape[0] < n or scratch.shape[1] != self.d_sae):
            raise ValueError(f"scratch {tuple(scratch.shape)} cannot hold [{n}, {self.d_sae}]")
        xc = x - self.b_dec
        with torch.no_grad():
            out = None if scratch is None else scratch[:n]
            pre = torch.addmm(self.b_enc, xc, self.enc.t(), out=out)
            top_pre, top_idx = pre.topk(self.k, dim=1, sorted=False)
            fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
            fired[top_idx[top_pre > 0]] = True
            self.since_fired += n
            self.since_fired.masked_fill_(fired, 0)
            aux_idx = None
            if self.auxk_alpha > 0 and n > 1:
                dead_idx = self.dead_mask().nonzero().squeeze(1)
                aux_k = min(self.auxk_k, dead_idx.numel())
                if aux_k > 0:
                    aux_pre, sub = pre.index_select(1, dead_idx).topk(aux_k, dim=1, sorted=False)
                    aux_idx = dead_idx[sub]
            del pre
        if aux_idx is None:
            top_vals = F.relu(_SelectedPreacts.apply(xc, self.enc, self.b_enc, top_idx, top_pre))
        else:  # one sparse backward for both selections
            both = _SelectedPreacts.apply(
                xc,
                self.enc,
                self.b_enc,
                torch.cat([top_idx, aux_idx], 1),
                torch.cat([top_pre, aux_pre], 1),
            )
            top_vals, aux_vals = F.relu(both).split([self.k, aux_idx.shape[1]], dim=1)
        recon = F.embedding_bag(top_idx, self.W_dec, per_sample_weights=top_vals, mode="sum") + self.b_dec
        error = x - recon
        sse = error.pow(2).sum()
        loss = sse / (n * self.variance)
        auxk = loss.new_zeros(())
        if aux_idx is not None:
            residual = error.detach()
            aux_recon = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux_vals.contiguous(), mode="sum")
            denom = (residual - residual.mean(0)).pow(2).sum()
            auxk = ((aux_recon - residual).pow(2).sum() / denom).nan_to_num(0.0, 0.0, 0.0)
            loss = loss + self.auxk_alpha * auxk
        with torch.no_grad():
            fvu = sse.detach() / (x - x.mean(0)).pow(2).sum().clamp(min=1e-30)
        return loss, StepStats(loss.detach(), fvu, auxk.detach())

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop each decoder row's gradient component along the row (rows are unit norm)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Scale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12))

    def to_sae(self, metadata: dict[str, Any]) -> SAE:
        """The trained weights as the project's `SAE` (float32, CPU)."""
        with torch.no_grad():
            return SAE(
                W_enc=self.enc.detach().t().contiguous().float().cpu(),
                b_enc=self.b_enc.detach().float().cpu(),
                W_dec=self.W_dec.detach().contiguous().float().cpu(),
                b_dec=self.b_dec.detach().float().cpu(),
                architecture="topk",
                k=self.k,
                hook_name=metadata.get("hook_name"),
                model_name=metadata.get("model_name"),
                metadata=metadata,
            )


# --------------------------------------------------------------------------- training loop


def _checked(batch: torch.Tensor, d_in: int) -> torch.Tensor:
    if batch.ndim != 2 or batch.shape[1] != d_in:
        raise ValueError(f"training batches must be [n, d_in={d_in}], got {tuple(batch.shape)}")
    return batch


def _peek(batches: Iterator[torch.Tensor], tokens: int, d_in: int) -> list[torch.Tensor]:
    """The first batches, until they hold `tokens` tokens (or the stream ends)."""
    head, held = [], 0
    while held < tokens:
        batch = next(batches, None)
        if batch is None:
            break
        head.append(_checked(batch, d_in))
        held += batch.shape[0]
    return head


def train_topk_grid(
    batches: Iterable[torch.Tensor],
    d_in: int,
    ks: list[int],
    cfg: TrainSettings,
    total_tokens: int,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
) -> dict[int, SAE]:
    """Train one TopK SAE per k from one pass over `batches` ([n, d_in] each, any device).

    Each batch is fed to every k's SAE in turn, so the activations are produced
    once; every SAE sees exactly what it would see alone (same seed, same
    stream), so ``result[k]`` equals ``train_topk`` with ``k`` on the same stream.
    Trains on `total_tokens` tokens (the last batch is cut to fit) and returns
    float32 SAEs on the CPU; `cfg.k` is ignored here. Their metadata's
    ``final_train_fvu`` is the last batch's FVU as its step saw it (with
    ``signum``: at the training iterate, not at the saved average).
    """
    ks = list(dict.fromkeys(int(k) for k in ks))
    if not ks:
        raise ValueError("train_topk_grid: empty k grid")
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    stream = iter(batches)
    head = _peek(stream, min(cfg.init_tokens, total_tokens), d_in)
    if not head:
        raise ValueError("train_topk_grid: the batch stream is empty")
    device = head[0].device
    sample = torch.cat([b.to(device=device, dtype=torch.float32) for b in head])[: cfg.init_tokens]
    if not torch.isfinite(sample).all():
        raise ValueError("train_topk_grid: the first batches hold NaN or infinite activations")
    init = _initial_statistics(sample, cfg)
    del sample

    trainees: dict[int, TopKTrainee] = {}
    optimisers: dict[int, Any] = {}
    base_lr = cfg.learning_rate(d_in)
    for k in ks:
        trainee = TopKTrainee(d_in, k, cfg, device)
        trainee.initialise(init)
        trainees[k] = trainee
        optimisers[k] = make_optimiser(list(trainee.parameters()), cfg, base_lr)

    label = f"k={ks[0]}" if len(ks) == 1 else f"k={','.join(map(str, ks))}"
    bar = tqdm(
        total=total_tokens,
        desc=f"train topk {label}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    seen, step = 0, 0
    stats: dict[int, StepStats] = {}
    scratch = torch.empty(0, cfg.latents(d_in), device=device)  # pre-activations, any SAE
    for raw in _chain(head, stream, d_in):
        x = raw[: total_tokens - seen].to(device=device, dtype=torch.float32)
        if scratch.shape[0] < x.shape[0]:
            scratch = torch.empty(x.shape[0], scratch.shape[1], device=device)
        factor = lr_factor(step, seen, total_tokens, cfg)
        for k, trainee in trainees.items():
            optimiser = optimisers[k]
            for group in optimiser.param_groups:
                group["lr"] = base_lr * factor
            loss, stats[k] = trainee.step_loss(x, scratch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            trainee.remove_parallel_decoder_grad()
            optimiser.step()
            trainee.normalise_decoder()
        seen += x.shape[0]
        step += 1
        bar.update(x.shape[0])
        done = seen >= total_tokens
        if step % 50 == 0 or done:  # a host sync now and then, not every step
            _check_finite(stats, step)
        if progress and (step % 10 == 0 or done):
            bar.set_postfix_str(_postfix(stats, trainees), refresh=False)
        if done:
            break  # before pulling another batch: the stream may be a model run
    bar.close()
    for k, optimiser in optimisers.items():
        if isinstance(optimiser, ScheduleFreeWrapper):
            # the parameters become the average: the trained SAE. An average of unit
            # rows that keep turning is shorter than unit, so the rows are renormalised.
            optimiser.eval()
            trainees[k].normalise_decoder()
    if seen < total_tokens:
        unfinished = " (the learning rate never finished its decay)" if cfg.decay() > 0 else ""
        warnings.warn(
            f"train_topk_grid: the batch stream ended after {seen} of {total_tokens} tokens{unfinished}",
            stacklevel=2,
        )

    out = {}
    for k, trainee in trainees.items():
        meta = {
            **(metadata or {}),
            "k": k,
            "d_sae": trainee.d_sae,
            "training_tokens": seen,
            "training_steps": step,
            "seed": cfg.seed,
            "lr": base_lr,
            "trainer_version": TRAINER_VERSION,
            "training_config": cfg.model_dump() | {"k": k, "decay_fraction": cfg.decay()},
            "final_train_fvu": float(stats[k].fvu) if k in stats else None,
            "final_dead_fraction": trainee.dead_fraction(),
        }
        if hook_name is not None:
            meta["hook_name"] = hook_name
        if model_name is not None:
            meta["model_name"] = model_name
        out[k] = trainee.to_sae(meta)
    return out


def _chain(head: list[torch.Tensor], stream: Iterator[torch.Tensor], d_in: int) -> Iterator[torch.Tensor]:
    yield from head
    for batch in stream:
        yield _checked(batch, d_in)


def _check_finite(stats: dict[int, StepStats], step: int) -> None:
    for k, s in stats.items():
        if not torch.isfinite(s.loss):
            raise FloatingPointError(f"TopK training (k={k}): the loss is {float(s.loss)} at step {step}")


def _postfix(stats: dict[int, StepStats], trainees: dict[int, TopKTrainee]) -> str:
    parts = []
    for k, s in stats.items():
        prefix = f"k{k} " if len(stats) > 1 else ""
        parts.append(f"{prefix}loss={float(s.loss):.4f} fvu={float(s.fvu):.4f} dead={trainees[k].dead_fraction():.3f}")
    return " | ".join(parts)


def train_topk(
    batches: Iterable[torch.Tensor],
    d_in: int,
    cfg: TrainSettings,
    total_tokens: int,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
) -> SAE:
    """One TopK SAE with ``cfg.k``: the grid trainer with a grid of one."""
    return train_topk_grid(
        batches,
        d_in,
        [cfg.k],
        cfg,
        total_tokens,
        progress,
        metadata,
        hook_name=hook_name,
        model_name=model_name,
    )[cfg.k]
