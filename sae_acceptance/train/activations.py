"""Shuffled activations at a hookpoint, produced by running the model only up to it.

The buffer fills with the activations of several sequences (counted positions
only), shuffles them with a seeded generator, and hands out training batches,
so consecutive batches are not dominated by one document.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sae_acceptance.sources.model import hook_layer


class ActivationBuffer:
    def __init__(
        self,
        model,
        tokens: torch.Tensor,
        hook_name: str,
        batch_size: int = 4096,
        buffer_tokens: int = 262_144,
        seed: int = 0,
        counted: torch.Tensor | None = None,
        total_tokens: int | None = None,
        model_batch: int = 32,
    ):
        self.model, self.tokens, self.hook_name = model, tokens, hook_name
        self.batch_size, self.buffer_tokens, self.seed = batch_size, buffer_tokens, seed
        self.counted = torch.ones_like(tokens, dtype=torch.bool) if counted is None else counted
        self.total_tokens = int(self.counted.sum()) if total_tokens is None else total_tokens
        self.model_batch = model_batch
        layer = hook_layer(hook_name)
        self.stop_at_layer = None if layer is None else layer + 1

    def _activations(self) -> Iterator[torch.Tensor]:
        """Counted activations of successive model batches, cycling over the tokens if needed."""
        n = self.tokens.shape[0]
        produced, begin = 0, 0
        while produced < self.total_tokens:
            tok = self.tokens[begin : begin + self.model_batch].to(self.model.cfg.device)
            mask = self.counted[begin : begin + self.model_batch].to(self.model.cfg.device)
            with torch.inference_mode():  # only around the model: never across a yield
                _, cache = self.model.run_with_cache(tok, names_filter=self.hook_name, stop_at_layer=self.stop_at_layer)
                act = cache[self.hook_name].flatten(2)[mask].float()
            produced += act.shape[0]
            begin = (begin + self.model_batch) % n
            yield act.clone()  # a normal tensor, usable for training

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        pending: list[torch.Tensor] = []
        pending_tokens, handed_out = 0, 0
        source = self._activations()
        exhausted = False
        while handed_out < self.total_tokens:
            while not exhausted and pending_tokens < self.buffer_tokens:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                pending.append(chunk)
                pending_tokens += chunk.shape[0]
            if pending_tokens == 0:
                return
            buffer = torch.cat(pending)
            buffer = buffer[torch.randperm(buffer.shape[0], generator=generator).to(buffer.device)]
            # hand out whole batches from half the buffer (all of it at the end); the rest
            # stays to mix with new data
            whole = buffer.shape[0] // 2 // self.batch_size * self.batch_size
            keep = 0 if exhausted else buffer.shape[0] - max(whole, self.batch_size)
            give = buffer[max(keep, 0):]
            keep = max(keep, 0)
            pending, pending_tokens = [buffer[:keep]], keep
            for start in range(0, give.shape[0], self.batch_size):
                batch = give[start : start + self.batch_size]
                batch = batch[: self.total_tokens - handed_out]
                if batch.shape[0] == 0:
                    return
                handed_out += batch.shape[0]
                yield batch


def activation_batches_from_tensor(acts: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Cached activations [N, d], shuffled once with a seed, in batches."""
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))
    for start in range(0, acts.shape[0], batch_size):
        yield acts[order[start : start + batch_size]]
