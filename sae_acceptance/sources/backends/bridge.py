"""TransformerLens 4 `TransformerBridge`: TransformerLens hook names over the Hugging Face model.

The bridge's compatibility mode gives the 3.x hook names (`blocks.L.hook_resid_post`,
`blocks.L.attn.hook_z`, ...); it is switched on without weight processing unless the
SAE recorded processing. The bridge puts its components into the Hugging Face model in
place of the modules they wrap, and weight processing rewrites those same components:
the model's decoder layers *are* the bridge's blocks, processed or not. Its own
`start_at_layer` still runs the earlier blocks, so a tail here calls the layers from the
patched one on as the `hf` backend does (the arguments the original forward gave them,
then the final norm and the head), with the hooks on the bridge's hook points. Where the
family table does not know the architecture, or the layers are not the bridge's blocks,
every patched variant is a full forward (the report says so).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_acceptance.errors import SourceError
from sae_acceptance.sources.backends.base import Backend, Pass, Patch, Site
from sae_acceptance.sources.backends.checkpoint import (
    NotForTransformerLens,
    checkpoint_special_ids,
    first_line,
    has_tokenizer,
    loading_checkpoint,
)
from sae_acceptance.sources.backends.families import family_of
from sae_acceptance.sources.backends.hf import HFBackend
from sae_acceptance.sources.backends.transformer_lens import (
    _replace,
    _store,
    is_known_name,
    tl_site,
    unknown_name,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass
class BridgeBackend(Backend):
    """A TransformerLens 4 `TransformerBridge`: hooks by TransformerLens names, tails run on the
    Hugging Face model under it."""

    kind = "transformer_lens_4"
    hf: HFBackend | None = None  # the Hugging Face model under the bridge, where tails run (None: full passes)
    full_passes: bool = False  # force full passes (tests compare them with tails)

    @property
    def tail_only(self) -> bool:
        return self.hf is not None and not self.full_passes

    @classmethod
    def wrap(cls, bridge: Any, tokenizer: Any = "bridge", full_passes: bool = False) -> BridgeBackend:
        """`tokenizer="bridge"` keeps the bridge's own; None where the checkpoint has none."""
        cfg = bridge.cfg
        hf_config = bridge.original_model.config
        backend = cls(
            model=bridge,
            n_ctx=cfg.n_ctx,
            d_vocab=cfg.d_vocab,
            n_layers=cfg.n_layers,
            tokenizer=bridge.tokenizer if tokenizer == "bridge" else tokenizer,
            device=next(bridge.original_model.parameters()).device,
            config_special_ids=checkpoint_special_ids(hf_config),
            hf=_tail_runner(bridge),
            full_passes=full_passes,
        )
        backend.placement = {str(d): "<model>" for d in {p.device for p in bridge.original_model.parameters()}}
        return backend

    def _resolve(self, hook: str) -> Site:
        architectures = getattr(self.model.original_model.config, "architectures", None) or [None]
        return tl_site(hook, self.model.hook_dict, self.n_layers, architectures[0])

    def hook_device(self, hook: str) -> torch.device:
        param = next(self.model.blocks[self.site(hook).layer].parameters(), None)
        return param.device if param is not None else self.device

    def _run(
        self, tokens: torch.Tensor, sites: dict[str, Site], entries: set[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[int, torch.Tensor], Any]:
        acts: dict[str, torch.Tensor] = {}
        assert self.hf is not None or not entries  # entries are asked for only where tails run, on `hf`
        recording: AbstractContextManager[tuple[dict[int, torch.Tensor], dict[int, tuple[tuple, dict]]]] = (
            self.hf.recording(entries) if entries and self.hf is not None else nullcontext(({}, {}))
        )
        with (
            self.model.hooks(fwd_hooks=[(s.name, _store(acts, hook)) for hook, s in sites.items()]),
            recording as (entry_acts, layer_args),
        ):
            logits = self.model(tokens, use_cache=False)  # a cache among the layers' arguments would grow in tails
        return logits, acts, entry_acts, layer_args

    def _tail(self, start: int, x: torch.Tensor, hooked: list[tuple[Site, Patch]], original: Pass) -> torch.Tensor:
        assert self.hf is not None  # tails run only where the bridge has the HF model under it
        with self.model.hooks(fwd_hooks=[(s.name, _replace(patch)) for s, patch in hooked]):
            return self.hf.tail_from(start, x, original.state)

    def _full(self, tokens: torch.Tensor, hooked: list[tuple[Site, Patch]]) -> torch.Tensor:
        with self.model.hooks(fwd_hooks=[(s.name, _replace(patch)) for s, patch in hooked]):
            return self.model(tokens, use_cache=False)


def _tail_runner(bridge: Any) -> HFBackend | None:
    """The Hugging Face backend over the bridge's model, where its family is known and its
    decoder layers are the bridge's blocks (the modules whose weights processing rewrote)."""
    model = bridge.original_model
    architecture = (getattr(model.config, "architectures", None) or [None])[0]
    if family_of(architecture) is None and family_of(type(model).__name__) is None:  # as HFBackend.wrap finds it
        return None
    hf = HFBackend.wrap(model)
    layers, blocks = list(model.get_submodule(hf.layers_path)), list(getattr(bridge, "blocks", None) or [])
    if len(layers) != len(blocks) or any(a is not b for a, b in zip(layers, blocks, strict=True)):
        return None
    return hf


def load(
    source: str | Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any], devices: list[torch.device]
) -> BridgeBackend:
    """`TransformerBridge.boot_transformers`, then compatibility mode with the SAE's processing."""
    from transformer_lens.model_bridge import TransformerBridge

    placement: dict[str, Any] = {"n_devices": len(devices)} if devices else {"device": device}
    without_tokenizer = isinstance(source, Path) and not has_tokenizer(source)
    if without_tokenizer:  # else the bridge asks AutoTokenizer for files the directory does not have
        placement["tokenizer"] = _stand_in_tokenizer()
    try:
        with loading_checkpoint(source):
            bridge = TransformerBridge.boot_transformers(str(source), dtype=dtype, trust_remote_code=False, **placement)
    except (OSError, ValueError, KeyError, NotImplementedError, AttributeError) as err:
        if not isinstance(source, Path) and not is_known_name(source):
            raise NotForTransformerLens(unknown_name(source)) from None
        where = "TransformerLens 4 cannot load it" if isinstance(source, Path) else "TransformerLens 4 cannot boot it"
        raise NotForTransformerLens(f"model {str(source)!r}: {where} ({first_line(err)})") from None
    processing = {
        k: v
        for k, v in kwargs.items()
        if k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
    }
    try:
        bridge.enable_compatibility_mode(
            disable_warnings=True, no_processing=not any(processing.values()), **processing
        )
    except (ValueError, NotImplementedError) as err:
        raise SourceError(
            f"model {str(source)!r}: TransformerLens 4 compatibility mode failed ({first_line(err)})"
        ) from None
    bridge.eval()
    backend = BridgeBackend.wrap(bridge, tokenizer=None if without_tokenizer else "bridge")
    bridge._sae_acceptance_backend = backend
    return backend


def _stand_in_tokenizer() -> PreTrainedTokenizerFast:
    """A one-word tokenizer for booting a checkpoint that ships none; the backend reports None."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
