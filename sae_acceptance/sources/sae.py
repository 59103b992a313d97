"""The one SAE object the engine sees: encode raw activations, decode back to raw activations.

Every on-disk format (see `sources/formats/`) is mapped onto this object. It
covers the encoders people train (ReLU, TopK, sparsify's GroupMax, JumpReLU
with per-latent thresholds, gated) and transcoders (the output replaces another
activation, `hook_name_out`, optionally plus a linear skip from the input).
Input normalisation that depends on the token (`constant_norm_rescale`,
`layer_norm`) happens inside `reconstruct`, so callers pass raw activations and
get raw activations back; normalisation by a constant is folded into the
weights at load (`fold_input_scale`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sae_acceptance.errors import SAEFormatError

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "groupmax")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens's run-time layer_norm epsilon
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_mag", "r_mag", "W_skip")


@dataclass
class SparseCode:
    """Latents of a batch of tokens.

    For TopK and GroupMax SAEs only the k kept slots are stored (`values`,
    `indices`, each [n, k]); for the others `values` is the dense [n, d_sae]
    latent vector and `indices` is None. Decoding a sparse code is then a
    gather, not a matmul over d_sae.
    """

    values: torch.Tensor
    indices: torch.Tensor | None

    def l0(self) -> torch.Tensor:
        """Nonzero latents per token, [n]."""
        return (self.values != 0).sum(-1)

    def fired(self, d_sae: int) -> torch.Tensor:
        """How many tokens each latent fired on, [d_sae] int64."""
        active = (self.values != 0).to(torch.int64)
        if self.indices is None:
            return active.sum(0)
        counts = torch.zeros(d_sae, dtype=torch.int64, device=self.values.device)
        return counts.scatter_add_(0, self.indices.reshape(-1), active.reshape(-1))

    def fired_sequences(self, d_sae: int, n_sequences: int) -> torch.Tensor:
        """How many of the batch's sequences (its rows, in order, `n_sequences` of them) each
        latent fired in, [d_sae] int64."""
        active = (self.values != 0).reshape(n_sequences, -1, self.values.shape[-1])
        if self.indices is None:
            return active.any(1).sum(0).to(torch.int64)
        counts = torch.zeros(n_sequences, d_sae, dtype=torch.int64, device=self.values.device)
        counts.scatter_add_(1, self.indices.reshape(n_sequences, -1), active.reshape(n_sequences, -1).to(torch.int64))
        return (counts > 0).sum(0)

    def dense(self, d_sae: int) -> torch.Tensor:
        """[n, d_sae] latents (for callers that need every latent, e.g. tests and analysis)."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter_(-1, self.indices, self.values)


@dataclass
class SAE:
    """A single-layer sparse coder with a linear decoder.

    `W_enc` [d_in, d_sae], `b_enc` [d_sae] (the gate bias of a gated SAE),
    `W_dec` [d_sae, d_out], `b_dec` [d_out]. An ordinary SAE has d_out = d_in
    and writes back where it reads (`hook_name`); a transcoder reads at
    `hook_name` and its output replaces the activation at `hook_name_out`.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    architecture: str = "topk"
    k: int | None = None
    threshold: torch.Tensor | None = None  # [d_sae]: jumprelu
    apply_b_dec_to_input: bool = True
    hook_name: str | None = None
    model_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    b_mag: torch.Tensor | None = None  # [d_sae]: gated magnitude bias
    r_mag: torch.Tensor | None = None  # [d_sae]: gated log-scale of the magnitude encoder
    W_skip: torch.Tensor | None = None  # [d_out, d_in]: skip transcoders, out += x @ W_skip.T
    hook_name_out: str | None = None
    hook_head_index: int | None = None
    normalize_activations: str = "none"
    transcoder: bool = False  # the output replaces another activation (`hook_name_out`) than the input

    def __post_init__(self) -> None:
        where = self._where()
        self.transcoder = self.transcoder or self.hook_name_out is not None
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(
                f"{where}: architecture {self.architecture!r} is not supported "
                f"(expected one of {', '.join(ARCHITECTURES)})"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEFormatError(
                f"{where}: normalize_activations={self.normalize_activations!r} is not supported "
                f"(expected one of {', '.join(NORMALIZATIONS)})"
            )
        for name in ("W_enc", "W_dec"):
            t = getattr(self, name)
            if t.ndim != 2:
                raise SAEFormatError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected 2 dimensions")
        needed = {"jumprelu": ("threshold",), "gated": ("b_mag", "r_mag")}.get(self.architecture, ())
        for name in needed:
            if getattr(self, name) is None:
                raise SAEFormatError(f"{where}: {self.architecture} SAE has no {name!r} tensor")
        d_out = self.d_out if self.transcoder else self.d_in  # only a transcoder writes another width
        shapes = {
            "W_enc": (self.d_in, self.d_sae),
            "b_enc": (self.d_sae,),
            "W_dec": (self.d_sae, d_out),
            "b_dec": (d_out,),
            "threshold": (self.d_sae,),
            "b_mag": (self.d_sae,),
            "r_mag": (self.d_sae,),
            "W_skip": (d_out, self.d_in),
        }
        for name, t in self.tensors().items():
            if tuple(t.shape) != shapes[name]:
                raise SAEFormatError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {shapes[name]}")
        if self.architecture in ("topk", "groupmax") and (self.k is None or not 0 < self.k <= self.d_sae):
            raise SAEFormatError(f"{where}: {self.architecture} SAE needs 0 < k <= d_sae, got k={self.k}")
        if self.architecture == "groupmax" and self.k is not None and self.d_sae % self.k:
            raise SAEFormatError(f"{where}: groupmax needs d_sae divisible by k, got {self.d_sae} and k={self.k}")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise SAEFormatError(
                f"{where}: apply_b_dec_to_input needs d_out = d_in (a transcoder does not subtract b_dec), "
                f"got d_in={self.d_in}, d_out={self.d_out}"
            )

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "SAE"

    @property
    def d_in(self) -> int:
        """Width of the activation the SAE reads."""
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        """Width of the activation the SAE writes (d_in, except for a transcoder)."""
        return self.W_dec.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.W_enc.dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weight tensors the SAE has, by field name."""
        return {name: t for name in _TENSORS if (t := getattr(self, name)) is not None}

    def nonfinite_tensors(self) -> list[str]:
        """Names of the weight tensors holding NaN or infinity."""
        return [name for name, t in self.tensors().items() if not torch.isfinite(t).all()]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        """A copy with every weight tensor moved to `device` and cast to `dtype`."""
        moved: dict[str, Any] = {name: t.to(device=device, dtype=dtype) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    # ------------------------------------------------------------------ forward

    def encode(self, x: torch.Tensor) -> SparseCode:
        """x [n, d_in] (already normalised, see `reconstruct`) -> latents."""
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = sae_in @ self.W_enc + self.b_enc
        # `__post_init__` checked that each architecture has what it reads (k, threshold, b_mag, r_mag)
        if self.architecture == "topk":
            assert self.k is not None
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return SparseCode(F.relu(values), indices)
        if self.architecture == "groupmax":  # sparsify: the largest ReLU'd latent of each of k groups
            assert self.k is not None
            values, local = F.relu(pre).unflatten(-1, (self.k, -1)).max(dim=-1)
            offsets = torch.arange(0, self.d_sae, self.d_sae // self.k, device=pre.device)
            return SparseCode(values, local + offsets)
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return SparseCode(F.relu(pre) * (pre > self.threshold), None)
        if self.architecture == "gated":  # b_enc is the gate bias
            assert self.r_mag is not None and self.b_mag is not None
            magnitude = F.relu((sae_in @ self.W_enc) * self.r_mag.exp() + self.b_mag)
            return SparseCode(magnitude * (pre > 0), None)
        return SparseCode(F.relu(pre), None)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """Latents -> output [n, d_out] before the skip connection; sparse codes decode by a gather."""
        if code.indices is None:
            return code.values @ self.W_dec + self.b_dec
        gathered = F.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values, mode="sum")
        return gathered + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        """Raw activations [n, d_in] -> (output in the raw space of the out activation [n, d_out], code)."""
        normed, undo = self._normalise(x)
        code = self.encode(normed)
        out = undo(self.decode(code))
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out, code

    def _normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Per-token input normalisation and the map that undoes it on the output (SAELens's run-time modes)."""
        if self.normalize_activations == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coeff, lambda y: y / coeff
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + LAYER_NORM_EPS), lambda y: y * std + mu
        return x, lambda y: y


def fold_input_scale(sae: SAE, scale: float) -> SAE:
    """The SAE that reads raw x where `sae` read x * scale (and wrote outputs in that scaled space)."""
    return dataclasses.replace(
        sae,
        W_enc=sae.W_enc * scale,
        W_dec=sae.W_dec / scale,
        b_dec=sae.b_dec / scale,
    )


def fold_decoder_norm_rescale(sae: SAE) -> SAE:
    """TopK with `rescale_acts_by_decoder_norm`: pre-activations times ‖W_dec row‖, decoded divided by it.

    Folded: the same top-k choice, the same latent values, the same output."""
    norm = sae.W_dec.norm(dim=-1)
    return dataclasses.replace(sae, W_enc=sae.W_enc * norm, b_enc=sae.b_enc * norm, W_dec=sae.W_dec / norm[:, None])
