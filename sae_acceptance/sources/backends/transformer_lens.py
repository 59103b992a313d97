"""TransformerLens 3 `HookedTransformer`: hook points by name, tails through `start_at_layer`.

`start_at_layer` takes the residual entering a block and really runs only the later
blocks, so a tail costs only what follows the patched point. A module path on a
family the table knows is accepted and translated to the TransformerLens name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch

from sae_acceptance.errors import SourceError
from sae_acceptance.hooks import HookPoint
from sae_acceptance.sources.backends.base import Backend, Pass, Patch, Site, apply
from sae_acceptance.sources.backends.families import family_of


def tl_site(hook: str, hook_names, n_layers: int, architecture: str | None) -> Site:
    """`hook` as a Site on a model with TransformerLens hook names (module paths translated)."""
    name = hook if hook in hook_names else from_module_path(hook, architecture)
    if name is None or name not in hook_names:
        close = difflib.get_close_matches(hook, list(hook_names), n=3, cutoff=0.5)
        hint = f"; closest valid hooks: {', '.join(close)}" if close else ""
        raise SourceError(f"hook {hook!r} does not exist in the model{hint}")
    point = HookPoint.parse(name)
    if point.layer is None or point.layer >= n_layers:
        raise SourceError(f"hook {hook!r} is outside the blocks; only hooks inside them (blocks.L.…) can be patched")
    position = "out" if point.is_resid_post else "in" if point.is_resid_pre else "inside"
    return Site(name, point.layer, position)


def from_module_path(path: str, architecture: str | None) -> str | None:
    """`gpt_neox.layers.3.mlp` (or sparsify's `layers.3.mlp`) -> `blocks.3.hook_mlp_out`."""
    family = family_of(architecture)
    if family is None:
        return None
    path = path.removesuffix(".output")
    container = family.layers.rsplit(".", 1)[-1]
    for prefix in (family.layers + ".", container + "."):
        if path.startswith(prefix):
            head, _, inner = path[len(prefix) :].partition(".")
            kind = family.tl_kind(inner) if head.isdigit() else None
            return None if kind is None else str(HookPoint.at(int(head), kind))
    return None


@dataclass
class TransformerLensBackend(Backend):
    kind = "transformer_lens"

    @classmethod
    def wrap(cls, model: Any, config_special_ids: list[int] | None = None) -> TransformerLensBackend:
        cfg = model.cfg
        backend = cls(
            model=model,
            n_ctx=cfg.n_ctx,
            d_vocab=cfg.d_vocab,
            n_layers=cfg.n_layers,
            tokenizer=getattr(model, "tokenizer", None),
            device=torch.device(cfg.device),
            config_special_ids=list(config_special_ids or []),
        )
        backend.placement = _placement(model)
        return backend

    def _resolve(self, hook: str) -> Site:
        return tl_site(hook, self.model.hook_dict, self.n_layers, self.model.cfg.original_architecture)

    def hook_device(self, hook: str) -> torch.device:
        from transformer_lens.utilities import get_device_for_block_index

        return torch.device(get_device_for_block_index(self.site(hook).layer, self.model.cfg))

    def _entry_name(self, start: int) -> str:
        if start < self.n_layers:
            return str(HookPoint.at(start, "hook_resid_pre"))
        return str(HookPoint.at(self.n_layers - 1, "hook_resid_post"))

    def _run(self, tokens, sites, entries):
        acts: dict[str, torch.Tensor] = {}
        entry_acts: dict[int, torch.Tensor] = {}
        fwd_hooks = [(s.name, _store(acts, hook)) for hook, s in sites.items()]
        fwd_hooks += [(self._entry_name(e), _store(entry_acts, e)) for e in entries]
        with self.model.hooks(fwd_hooks=fwd_hooks):
            logits = self.model(tokens)
        return logits, acts, entry_acts, None

    def _tail(self, start: int, x: torch.Tensor, hooked: list[tuple[Site, Patch]], original: Pass) -> torch.Tensor:
        fwd_hooks = [(s.name, _replace(patch)) for s, patch in hooked]
        with self.model.hooks(fwd_hooks=fwd_hooks):
            return self.model(x, start_at_layer=start)


def _store(into: dict, key):
    def hook(act, hook):
        into[key] = act

    return hook


def _replace(patch: Patch):
    def hook(act, hook):
        return apply(patch, act)

    return hook


def _placement(model) -> dict[str, str]:
    """Which device holds which blocks (TransformerLens splits blocks evenly over n_devices)."""
    from transformer_lens.utilities import get_device_for_block_index

    cfg = model.cfg
    groups: dict[str, list[int]] = {}
    for layer in range(cfg.n_layers):
        groups.setdefault(str(get_device_for_block_index(layer, cfg)), []).append(layer)
    return {device: f"blocks {layers[0]}-{layers[-1]}" for device, layers in groups.items()}
