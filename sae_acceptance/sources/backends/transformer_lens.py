"""TransformerLens 3 `HookedTransformer`: hook points by name, tails through `start_at_layer`.

`start_at_layer` takes the residual entering a block and really runs only the later
blocks, so a tail costs only what follows the patched point. A module path on a
family the table knows is accepted and translated to the TransformerLens name that
is exactly that activation; one with no such name is refused, naming the hf backend.
"""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from sae_acceptance.errors import SourceError
from sae_acceptance.hooks import HookPoint
from sae_acceptance.sources.backends.base import Backend, Pass, Patch, Site, apply
from sae_acceptance.sources.backends.checkpoint import (
    NO_REMOTE_CODE,
    NotForTransformerLens,
    checkpoint_special_ids,
    closest_names,
    dtype_kwarg,
    first_line,
    has_tokenizer,
    loading_checkpoint,
)
from sae_acceptance.sources.backends.families import family_of, inside_layer, is_module_point

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.hook_points import HookPoint as TLHookPoint


def tl_site(hook: str, hook_names: Collection[str], n_layers: int, architecture: str | None) -> Site:
    """`hook` as a Site on a model with TransformerLens hook names (module paths translated)."""
    name = hook if hook in hook_names else from_module_path(hook, architecture)
    if name is None and is_module_point(hook):
        raise SourceError(
            f"hook {hook!r}: no TransformerLens hook of {architecture or 'this model'} is exactly this "
            'Hugging Face module point; evaluate it with backend = "hf"'
        )
    if name is None or name not in hook_names:
        close = difflib.get_close_matches(hook, list(hook_names), n=3, cutoff=0.5)
        hint = f"; closest valid hooks: {', '.join(close)}" if close else ""
        raise SourceError(f"hook {hook!r} does not exist in the model{hint}")
    point = HookPoint.parse(name)
    if point.layer is None or point.layer >= n_layers:
        raise SourceError(f"hook {hook!r} is outside the blocks; only hooks inside them (blocks.L.…) can be patched")
    position: Literal["in", "out", "inside"] = (
        "out" if point.is_resid_post else "in" if point.is_resid_pre else "inside"
    )
    return Site(name, point.layer, position)


def from_module_path(path: str, architecture: str | None) -> str | None:
    """`gpt_neox.layers.3.mlp` (or sparsify's `layers.3.mlp`) -> `blocks.3.hook_mlp_out`."""
    family = family_of(architecture)
    at = inside_layer(path, family) if family else None
    kind = family.tl_kind(at[1]) if family and at else None
    return None if kind is None or at is None else str(HookPoint.at(at[0], kind))


@dataclass
class TransformerLensBackend(Backend):
    """A TransformerLens `HookedTransformer`, hooked by its own hook names."""

    kind = "transformer_lens"

    @classmethod
    def wrap(cls, model: Any, config_special_ids: list[int] | None = None) -> TransformerLensBackend:
        """A backend around a loaded model: its sizes read from its config."""
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

    def _run(
        self, tokens: torch.Tensor, sites: dict[str, Site], entries: set[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[int, torch.Tensor], Any]:
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


def _store(into: dict[Any, torch.Tensor], key: Any) -> Callable[[torch.Tensor, TLHookPoint], None]:
    def hook(act: torch.Tensor, hook: TLHookPoint) -> None:
        into[key] = act

    return hook


def _replace(patch: Patch) -> Callable[[torch.Tensor, TLHookPoint], torch.Tensor]:
    def hook(act: torch.Tensor, hook: TLHookPoint) -> torch.Tensor:
        return apply(patch, act)

    return hook


def _placement(model: HookedTransformer) -> dict[str, str]:
    """Which device holds which blocks (TransformerLens splits blocks evenly over n_devices)."""
    from transformer_lens.utilities import get_device_for_block_index

    cfg = model.cfg
    groups: dict[str, list[int]] = {}
    for layer in range(cfg.n_layers):
        groups.setdefault(str(get_device_for_block_index(layer, cfg)), []).append(layer)
    return {device: f"blocks {layers[0]}-{layers[-1]}" for device, layers in groups.items()}


def load(
    source: str | Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any], devices: list[torch.device]
) -> TransformerLensBackend:
    """A HookedTransformer from a hub name or a local checkpoint directory, wrapped."""
    n_devices = len(devices) or 1
    if devices and [d.index or 0 for d in devices] != list(range(n_devices)):
        raise SourceError(
            f"devices = {[str(d) for d in devices]}: TransformerLens places a model on cuda:0..{n_devices - 1} "
            "only; set CUDA_VISIBLE_DEVICES, or use backend hf"
        )
    if isinstance(source, Path):
        model, ids = _load_local(source, dtype, kwargs, n_devices)
    else:
        model, ids = _load_hub(source, device, dtype, kwargs, n_devices), []
    model.eval()
    if n_devices == 1:
        model = model.to(device, print_details=False)
    else:
        model.move_model_modules_to_device()
    backend = TransformerLensBackend.wrap(model, ids)
    model._sae_acceptance_backend = backend  # type: ignore[assignment]  # torch types a module's attributes as tensors or modules
    return backend


def _names() -> list[str]:
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    return [*OFFICIAL_MODEL_NAMES, *(alias for aliases in MODEL_ALIASES.values() for alias in aliases)]


def is_known_name(name: str) -> bool:
    """Whether TransformerLens lists `name` (an official name or an alias, any case)."""
    return name.lower() in {n.lower() for n in _names()}


def unknown_name(name: str) -> str:
    """The one line for a name that is neither a directory nor a model TransformerLens lists."""
    return f"model {name!r}: no such local directory, and not a model name TransformerLens knows" + closest_names(
        name, _names()
    )


def _load_hub(
    name: str, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any], n_devices: int
) -> HookedTransformer:
    from transformer_lens import HookedTransformer, loading

    if not is_known_name(name):
        raise NotForTransformerLens(unknown_name(name))
    if loading.get_official_model_name(name).startswith(loading.NEED_REMOTE_CODE_MODELS):
        # TransformerLens sets trust_remote_code for these; `auto` tries transformers' own classes
        raise NotForTransformerLens(
            f"model {name!r}: TransformerLens loads it by running its repository's code, which the gate never does"
        )
    try:
        return HookedTransformer.from_pretrained(name, device=device, dtype=dtype, n_devices=n_devices, **kwargs)
    except OSError as err:  # hub unreachable, or the repository is missing
        raise SourceError(f"model {name!r}: cannot download it from the hub ({first_line(err)})") from None


def _load_local(
    path: Path, dtype: torch.dtype, kwargs: dict[str, Any], n_devices: int
) -> tuple[HookedTransformer, list[int]]:
    """Offline: a `save_pretrained` directory through TransformerLens' own converters; its config's
    special-token ids beside it (the special tokens where it ships no tokenizer)."""
    from transformer_lens import HookedTransformer, loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with loading_checkpoint(path):
            hf_model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(torch.float32), **NO_REMOTE_CODE)
    except (OSError, ValueError, KeyError) as err:
        raise SourceError(f"model {str(path)!r}: cannot load as a local checkpoint ({first_line(err)})") from None
    with _neutral_name(path) as neutral:
        try:
            cfg = loading.get_pretrained_model_config(
                neutral, dtype=dtype, fold_ln=kwargs["fold_ln"], n_devices=n_devices
            )
        except (OSError, ValueError, KeyError, NotImplementedError, AttributeError, TypeError) as err:
            raise NotForTransformerLens(
                f"model {str(path)!r}: TransformerLens cannot convert a {type(hf_model).__name__} ({first_line(err)})"
            ) from None
        state = loading.get_pretrained_state_dict(neutral, cfg, hf_model)
    tokenizer = AutoTokenizer.from_pretrained(path, **NO_REMOTE_CODE) if has_tokenizer(path) else None
    if tokenizer is None:
        cfg.tokenizer_name = None  # else HookedTransformer asks AutoTokenizer for the directory's files
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=kwargs["fold_ln"],
        center_writing_weights=kwargs["center_writing_weights"],
        center_unembed=kwargs["center_unembed"],
        fold_value_biases=kwargs["fold_value_biases"],
    )
    return model.to(dtype, print_details=False), checkpoint_special_ids(hf_model.config)


@contextmanager
def _neutral_name(path: Path) -> Iterator[str]:
    """The directory under a name with no model family in it: TransformerLens 3 reads a local
    path containing `llama` or `gemma` as a hub name and guesses the configuration from it."""
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "checkpoint"
        link.symlink_to(path.resolve(), target_is_directory=True)
        yield str(link)
