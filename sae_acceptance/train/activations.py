"""Shuffled training activations at a hookpoint, produced by running the model only up to it.

`ActivationBuffer` runs the model on a few sequences at a time (blocks up to the
hook's layer only, under `torch.inference_mode`), keeps the counted positions,
and pools them in a buffer that is shuffled with a seeded generator; it hands
out batches from half of the buffer and refills that half, so a batch mixes
tokens of many sequences. It yields exactly `total_tokens` activations: the
first `total_tokens` counted positions of the sequences taken in order (and
again from the first sequence when the tokens run out), each exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from sae_acceptance.hooks import HookPoint

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


class ActivationBuffer:
    """Iterable of float32 training batches ``[batch_size, d]`` (the last one may be shorter).

    `tokens` is ``[n_seq, ctx]``; `counted` (same shape, bool) marks the
    positions to train on (all by default). Activations with more than one
    trailing dimension (``hook_z``: heads x d_head) are flattened. Iterating
    again restarts from the first sequence with the same shuffle.
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: torch.Tensor,
        hook_name: str,
        batch_size: int,
        buffer_tokens: int = 262_144,
        *,
        seed: int,
        counted: torch.Tensor | None = None,
        total_tokens: int | None = None,
        model_batch: int = 32,
        device: torch.device | str | None = None,
    ) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [n_seq, ctx], got shape {tuple(tokens.shape)}")
        if counted is None:
            counted = torch.ones(tokens.shape, dtype=torch.bool)
        if counted.shape != tokens.shape:
            raise ValueError(f"counted mask shape {tuple(counted.shape)} differs from tokens {tuple(tokens.shape)}")
        if batch_size <= 0 or buffer_tokens <= 0 or model_batch <= 0:
            raise ValueError("batch_size, buffer_tokens and model_batch must be positive")
        hooks = getattr(model, "hook_dict", None)
        if hooks is not None and hook_name not in hooks:
            raise ValueError(f"the model has no hook {hook_name!r}")
        self.model, self.tokens, self.hook_name = model, tokens, hook_name
        self.counted = counted.to(torch.bool)
        self.available = int(self.counted.sum())
        if self.available == 0:
            raise ValueError("no counted positions in the tokens: nothing to train on")
        self.total_tokens = self.available if total_tokens is None else int(total_tokens)
        if self.total_tokens <= 0:
            raise ValueError(f"total_tokens must be positive, got {self.total_tokens}")
        self.batch_size, self.buffer_tokens, self.seed = batch_size, buffer_tokens, seed
        self.model_batch = model_batch
        self.model_device = torch.device(getattr(model.cfg, "device", None) or "cpu")
        self.device = torch.device(device) if device is not None else self.model_device
        layer = HookPoint.parse(hook_name).layer
        if layer is not None:
            self.stop_at_layer: int | None = layer + 1
        elif hook_name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            self.stop_at_layer = 0
        else:
            self.stop_at_layer = None  # ln_final, unembed: the whole model

    def __len__(self) -> int:
        return -(-self.total_tokens // self.batch_size)

    def _run(self, tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(
                tok.to(self.model_device),
                names_filter=self.hook_name,
                stop_at_layer=self.stop_at_layer,
            )
            act = cache[self.hook_name]
            act = act.reshape(act.shape[0], act.shape[1], -1)[mask.to(act.device)]
            act = act.to(device=self.device, dtype=torch.float32)
        return act.clone()  # outside inference mode: an ordinary tensor, usable for training

    def activations(self) -> Iterator[torch.Tensor]:
        """Counted activations, model batch by model batch, in sequence order; `total_tokens` in all."""
        n_seq = self.tokens.shape[0]
        produced, begin = 0, 0
        while produced < self.total_tokens:
            rows = torch.arange(begin, begin + min(self.model_batch, n_seq)) % n_seq
            begin = (begin + rows.numel()) % n_seq
            mask = self.counted[rows]
            if not mask.any():
                continue
            act = self._run(self.tokens[rows], mask)[: self.total_tokens - produced]
            produced += act.shape[0]
            yield act

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        capacity = max(self.buffer_tokens, 2 * self.batch_size)
        hand_out = max(self.batch_size, capacity // 2 // self.batch_size * self.batch_size)
        source = self.activations()
        pending: list[torch.Tensor] = []
        held, exhausted = 0, False
        while True:
            while not exhausted and held < capacity:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                else:
                    pending.append(chunk)
                    held += chunk.shape[0]
            if held == 0:
                return
            pool = torch.cat(pending) if len(pending) > 1 else pending[0]
            pool = pool[torch.randperm(held, generator=generator).to(pool.device)]
            give = held if exhausted else min(hand_out, held)
            for start in range(0, give, self.batch_size):
                yield pool[start : min(start + self.batch_size, give)].clone()
            pending, held = [pool[give:]], held - give


def activation_batches_from_tensor(
    acts: torch.Tensor, batch_size: int, seed: int, total_tokens: int | None = None
) -> Iterator[torch.Tensor]:
    """Cached activations ``[N, d]`` in shuffled batches: one pass, or `total_tokens`
    tokens with a fresh seeded permutation for every further pass."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = acts.shape[0] if total_tokens is None else int(total_tokens)
    if acts.shape[0] == 0 and total > 0:
        raise ValueError("no activations to batch")
    generator = torch.Generator().manual_seed(seed)
    handed = 0
    while handed < total:
        order = torch.randperm(acts.shape[0], generator=generator).to(acts.device)
        for start in range(0, acts.shape[0], batch_size):
            take = min(batch_size, acts.shape[0] - start, total - handed)
            if take <= 0:
                return
            yield acts[order[start : start + take]]
            handed += take
