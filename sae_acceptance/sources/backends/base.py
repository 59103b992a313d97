"""What the engine needs from a model, whatever library runs it.

A backend runs one original forward that captures the requested hooks and the
residual stream where tails can start, and then patched forwards: the tail from
the earliest patched point only, where the model is a stack of layers the
backend can enter, else a full pass. Every hook is a `Site`: its block, and
whether it is the block's output (`out`), its input (`in`) or inside it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sae_acceptance.errors import SourceError
from sae_acceptance.hooks import HookPoint

Patch = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""A hook's new activation, flat [batch, pos, width]: a tensor computed beforehand, or a
function of the activation the patched forward computes there (a splice's later members
see what its earlier members changed)."""

Patches = Sequence[tuple[str, Patch]]


@dataclass(frozen=True)
class Site:
    """A hook resolved on one backend: `name` in the backend's own terms, the block it is in."""

    name: str
    layer: int
    position: Literal["in", "out", "inside"]

    @property
    def entry(self) -> int:
        """The first block a tail must run for this hook to be patched (n_layers: none)."""
        return self.layer + 1 if self.position == "out" else self.layer

    def is_entry_of(self, start: int) -> bool:
        """Whether this hook's activation *is* the residual entering block `start`."""
        return (self.position == "out" and self.layer + 1 == start) or (self.position == "in" and self.layer == start)


@dataclass
class Pass:
    """One batch's original forward: logits, captured activations (flat, by hook name as
    asked), the residual entering each block a tail may start at, and backend state."""

    tokens: torch.Tensor
    logits: torch.Tensor | None
    acts: dict[str, torch.Tensor]
    entries: dict[int, torch.Tensor]
    state: Any = None


def flat(act: torch.Tensor) -> torch.Tensor:
    """[batch, pos, ...] -> [batch, pos, width] (hook_z's heads concatenated)."""
    return act if act.ndim == 3 else act.flatten(2)


def apply(patch: Patch, act: torch.Tensor) -> torch.Tensor:
    """The activation `patch` puts where `act` was, in `act`'s shape and dtype."""
    new = patch(flat(act)) if callable(patch) else patch
    return new.reshape(act.shape).to(act.dtype)


@dataclass
class Backend(ABC):
    """A loaded model as the engine sees it. `model` is the library's own object."""

    model: Any
    n_ctx: int
    d_vocab: int
    n_layers: int
    tokenizer: Any
    device: torch.device
    config_special_ids: list[int] = field(default_factory=list)
    placement: dict[str, str] = field(default_factory=dict)
    _sites: dict[str, Site] = field(default_factory=dict, repr=False)
    _widths: dict[str, int] = field(default_factory=dict, repr=False)

    kind = "base"

    @property
    def tail_only(self) -> bool:
        """Whether patched passes run only the blocks from the earliest patched point."""
        return True

    # ------------------------------------------------------------------ hooks

    @abstractmethod
    def _resolve(self, hook: str) -> Site:
        """`hook` (this backend's name, or the other naming where a mapping exists) as a Site."""

    def site(self, hook: str) -> Site:
        """Where `hook` is on this model, resolved once and remembered."""
        if hook not in self._sites:
            self._sites[hook] = self._resolve(hook)
        return self._sites[hook]

    def hook_layer(self, hook: str) -> int | None:
        """The block of `hook`, None where it cannot be resolved on this model."""
        try:
            return self.site(hook).layer
        except SourceError:
            return None

    def hook_width(self, hook: str) -> int:
        """Width of the flat activation at `hook` (one probe forward, cached)."""
        if hook not in self._widths:
            probe = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self._widths[hook] = int(self.forward(probe, [hook]).acts[hook].shape[-1])
        return self._widths[hook]

    def hook_device(self, hook: str) -> torch.device:
        """Where the activation at `hook` lives (its SAE goes there)."""
        return self.device

    def block_output(self, layer: int) -> str:
        """The hook of block `layer`'s output (the residual stream after it), in this backend's names."""
        return str(HookPoint.at(layer))

    def special_token_ids(self) -> list[int]:
        """The tokenizer's BOS/EOS/PAD ids, else the checkpoint config's."""
        tok = self.tokenizer
        if tok is None:
            return sorted(set(self.config_special_ids))
        ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        return sorted(i for i in ids if i is not None)

    # ------------------------------------------------------------------ passes

    def forward(self, tokens: torch.Tensor, hooks: Iterable[str]) -> Pass:
        """The original forward: logits, every hook in `hooks`, and the tails' entry residuals."""
        sites = {hook: self.site(hook) for hook in hooks}
        entries = {s.entry for s in sites.values()} if self.tail_only else set()
        logits, acts, entry_acts, state = self._run(tokens, sites, entries)
        return Pass(tokens, logits, {h: flat(a) for h, a in acts.items()}, entry_acts, state)

    def patched(self, original: Pass, patches: Patches) -> torch.Tensor:
        """Logits with every hook in `patches` replaced (in forward order), from the tail where possible."""
        sited = [(self.site(hook), patch) for hook, patch in patches]
        if not self.tail_only:
            return self._full(original.tokens, sited)
        start = min(s.entry for s, _ in sited)
        x = original.entries[start]
        for s, patch in sited:
            if s.is_entry_of(start):
                x = apply(patch, x)
        hooked = [(s, patch) for s, patch in sited if not s.is_entry_of(start)]
        return self._tail(start, x, hooked, original)

    @abstractmethod
    def _run(
        self, tokens: torch.Tensor, sites: dict[str, Site], entries: set[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[int, torch.Tensor], Any]:
        """Full forward capturing `sites` (by hook name) and the residual entering each of `entries`."""

    @abstractmethod
    def _tail(self, start: int, x: torch.Tensor, hooked: list[tuple[Site, Patch]], original: Pass) -> torch.Tensor:
        """Logits from residual `x` entering block `start`, with `hooked` applied where they occur."""

    def _full(self, tokens: torch.Tensor, hooked: list[tuple[Site, Patch]]) -> torch.Tensor:
        """Logits of a full forward with `hooked` applied (backends without tails)."""
        raise NotImplementedError
