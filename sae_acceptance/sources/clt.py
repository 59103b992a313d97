"""A cross-layer transcoder (CLT) as the engine sees it: per layer an encoder reading that layer's
MLP input and decoders writing to its own and later layers' MLP outputs.

A set of per-layer transcoders is the same object with each layer's decoder writing to its own
layer only. The replacement model puts, at every layer L, the sum of the decoders that write to L
(each scaled by its features, computed from the input of its own layer in the patched forward)
in place of the MLP's output: `reconstruct_layer` is that sum, one layer at a time, in forward
order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class CLT:
    """Weights in the orientation `x @ W`: per layer l, `W_enc[l]` [d_model, d_latent], `b_enc[l]`,
    `threshold[l]` (JumpReLU; None for ReLU), `W_dec[l]` [d_latent, n_out, d_model] writing to
    layers l .. l + n_out − 1, `b_dec[l]` [d_model] (the output bias at layer l), and `W_skip[l]`
    [d_model, d_model] (output += input @ W_skip[l]) or None."""

    W_enc: list[torch.Tensor]
    b_enc: list[torch.Tensor]
    W_dec: list[torch.Tensor]
    b_dec: list[torch.Tensor]
    threshold: list[torch.Tensor] | None = None
    W_skip: list[torch.Tensor] | None = None
    input_hook: str = "hook_resid_mid"
    output_hook: str = "hook_mlp_out"
    model_name: str | None = None
    kind: str = "cross_layer_transcoder"  # or "transcoder_set"
    path: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """How many layers have an encoder (each replaces its layer's MLP output)."""
        return len(self.W_enc)

    @property
    def d_model(self) -> int:
        """The width every encoder reads and every decoder writes."""
        return int(self.b_dec[0].shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are held in (all layers share it)."""
        return self.b_dec[0].dtype

    def d_latent(self, layer: int) -> int:
        """How many features layer `layer`'s encoder has."""
        return int(self.b_enc[layer].shape[0])

    def hook_in(self, layer: int) -> str:
        """Where layer `layer`'s encoder reads (a TransformerLens hook name)."""
        return f"blocks.{layer}.{self.input_hook}"

    def hook_out(self, layer: int) -> str:
        """Where the decoders writing to layer `layer` write."""
        return f"blocks.{layer}.{self.output_hook}"

    def writers(self, layer: int) -> list[int]:
        """The layers whose decoders write to `layer`."""
        return [s for s in range(layer + 1) if s + self.W_dec[s].shape[1] > layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s features of flat [n, d_model] `x` (ReLU, or JumpReLU with its threshold)."""
        pre = x.to(self.dtype) @ self.W_enc[layer] + self.b_enc[layer]
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold[layer])

    def targets(self, source: int) -> range:
        """The layers that layer `source`'s decoders write to."""
        return range(source, source + self.W_dec[source].shape[1])

    def decode_to(self, source: int, target: int, features: torch.Tensor) -> torch.Tensor:
        """What layer `source`'s features write to layer `target` (no bias)."""
        return features @ self.W_dec[source][:, target - source]

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A skip transcoder's linear term from layer `layer`'s input (zero without one)."""
        if self.W_skip is None:
            return torch.zeros((), dtype=self.dtype, device=x.device)
        return x.to(self.dtype) @ self.W_skip[layer]

    def reconstruct_layer(self, layer: int, features: dict[int, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The output written to layer `layer` from every layer's `features` and this layer's input
        `x`: `b_dec[layer]`, plus each writing layer's decoder in layer order, plus the skip (the
        engine accumulates the same sum, in the same order, as the forward reaches each layer)."""
        out = self.b_dec[layer].expand(x.shape[0], -1)
        for s in self.writers(layer):
            out = out + self.decode_to(s, layer, features[s])
        return out + self.skip(layer, x)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CLT:
        """A copy on `device` in `dtype` (None keeps each tensor's own)."""

        def move(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device=device, dtype=dtype or t.dtype) for t in ts]

        return dataclasses.replace(
            self,
            W_enc=move(self.W_enc),
            b_enc=move(self.b_enc),
            W_dec=move(self.W_dec),
            b_dec=move(self.b_dec),
            threshold=None if self.threshold is None else move(self.threshold),
            W_skip=None if self.W_skip is None else move(self.W_skip),
        )

    def nonfinite_tensors(self) -> list[str]:
        """Names (`W_dec_3` ...) of tensors that hold NaN or infinity."""
        bad = []
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            for i, t in enumerate(getattr(self, name) or []):
                if not bool(torch.isfinite(t).all()):
                    bad.append(f"{name}_{i}")
        return bad
