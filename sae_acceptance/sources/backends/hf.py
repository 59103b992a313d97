"""Plain Hugging Face causal LMs: hook points are module paths, patched with forward hooks.

`gpt_neox.layers.3` is that layer's output, `...attention.dense.input` the input of the
attention's output projection; sparsify's `layers.3` resolves against the model's layer
list, and TransformerLens names map through the family table. On a family the table
knows, a tail calls the decoder layers from the patched one on directly, with the
arguments the original forward gave them (masks, rotary embeddings), then the final
norm and the head: the earlier layers run once per batch. Elsewhere every patched
variant is a full forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    checkpoint_special_ids,
    dtype_kwarg,
    first_line,
    has_tokenizer,
    loading_checkpoint,
)
from sae_acceptance.sources.backends.families import Family, backends_for, family_of

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

_SUFFIXES = (".input", ".output")


@dataclass(frozen=True)
class HFSite(Site):
    """A Site on a Hugging Face model: the module and whether its input or output is meant."""

    module: torch.nn.Module
    io: str = "output"


@dataclass
class HFBackend(Backend):
    """A Hugging Face causal LM, hooked by module path; tails run from a layer's recorded inputs."""

    kind = "hf"
    family: Family | None = None
    layers_path: str | None = None
    full_passes: bool = False  # force full passes (tests compare them with tails)

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any = None, full_passes: bool = False) -> HFBackend:
        """A backend around a loaded model: its sizes, family and layers read from its config."""
        config = model.config
        architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        family = family_of(architecture) or family_of(type(model).__name__)
        backend = cls(
            model=model,
            n_ctx=int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0)),
            d_vocab=int(config.vocab_size),
            n_layers=int(config.num_hidden_layers),
            tokenizer=tokenizer,
            device=next(model.parameters()).device,
            config_special_ids=checkpoint_special_ids(config),
            family=family,
            layers_path=family.layers if family else _find_layers(model, config.num_hidden_layers),
            full_passes=full_passes,
        )
        backend.placement = _placement(model)
        return backend

    @property
    def tail_only(self) -> bool:
        return self.family is not None and not self.full_passes

    def _layers(self) -> torch.nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    # ------------------------------------------------------------------ hooks

    def module_path(self, hook: str) -> str:
        """`hook` as a module path of this model (with `.input` where the input is meant)."""
        point = HookPoint.parse(hook)
        if point.layer is not None:
            path = self.family.module_path(point.layer, point.kind) if self.family else None
            if path is None:
                known = ", ".join(self.family.kinds) if self.family else "none (unknown architecture)"
                why = (
                    "no module's output or input is this TransformerLens point; "
                    'evaluate it with backend = "transformer_lens"'
                    if backends_for(hook) == ("transformer_lens",)
                    else f"TransformerLens kinds mapped: {known}; name a module path instead "
                    f"(e.g. {self.layers_path}.{point.layer})"
                )
                raise SourceError(f"hook {hook!r} has no module path on {type(self.model).__name__}; {why}")
            return path
        if self.layers_path and not _has_module(self.model, _strip(hook)[0]):
            container = self.layers_path.rsplit(".", 1)[-1]
            if hook.startswith(container + "."):  # sparsify: `layers.3` relative to the layer list
                return f"{self.layers_path}.{hook[len(container) + 1 :]}"
        return hook

    def _resolve(self, hook: str) -> Site:
        path, io = _strip(self.module_path(hook))
        if not _has_module(self.model, path):
            raise SourceError(
                f"hook {hook!r}: {type(self.model).__name__} has no module {path!r} "
                f"(decoder layers: {self.layers_path}.0-{self.n_layers - 1}; suffix .input for a module's input)"
            )
        prefix = f"{self.layers_path}."
        head, _, inner = path[len(prefix) :].partition(".") if path.startswith(prefix) else ("", "", "")
        if not head.isdigit():
            raise SourceError(
                f"hook {hook!r} is outside the decoder layers ({self.layers_path}.L…); only hooks inside them can be patched"
            )
        layer = int(head)
        position: Literal["in", "out", "inside"] = "inside" if inner else ("in" if io == "input" else "out")
        return HFSite(path + (".input" if io == "input" else ""), layer, position, self.model.get_submodule(path), io)

    def hook_device(self, hook: str) -> torch.device:
        site = self.site(hook)
        assert isinstance(site, HFSite)  # this backend resolves every hook to one
        module = site.module
        param = next(module.parameters(), None)
        return param.device if param is not None else self.device

    def block_output(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}"

    # ------------------------------------------------------------------ passes

    def _run(
        self, tokens: torch.Tensor, sites: dict[str, Site], entries: set[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[int, torch.Tensor], Any]:
        acts: dict[str, torch.Tensor] = {}
        handles = [_attach(s, _store(acts, hook)) for hook, s in sites.items()]
        try:
            with self.recording(entries) as (entry_acts, layer_args):
                logits = self.model(input_ids=tokens, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return logits, acts, entry_acts, layer_args

    def _tail(self, start: int, x: torch.Tensor, hooked: list[tuple[Site, Patch]], original: Pass) -> torch.Tensor:
        handles = [_attach(s, _replace(patch)) for s, patch in hooked]
        try:
            return self.tail_from(start, x, original.state)
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def recording(self, entries: set[int]) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, tuple[tuple, dict]]]]:
        """Within it, a forward fills (the residual entering each block of `entries`, what it
        passed each layer from the first of them on beside the residual): `tail_from`'s state."""
        entry_acts: dict[int, torch.Tensor] = {}
        layer_args: dict[int, tuple[tuple, dict]] = {}
        handles = []
        if entries:
            layers = self._layers()
            for i in range(min(entries), self.n_layers):
                handles.append(
                    layers[i].register_forward_pre_hook(_record(layer_args, entry_acts, i), with_kwargs=True)
                )
            if self.n_layers in entries:
                handles.append(
                    self._final_norm().register_forward_pre_hook(
                        _record({}, entry_acts, self.n_layers), with_kwargs=True
                    )
                )
        try:
            yield entry_acts, layer_args
        finally:
            for handle in handles:
                handle.remove()

    def tail_from(self, start: int, x: torch.Tensor, layer_args: dict[int, tuple[tuple, dict]]) -> torch.Tensor:
        """Logits from residual `x` entering layer `start`: the layers from there with the
        arguments `recording` kept, the final norm, the head."""
        layers = self._layers()
        for i in range(start, self.n_layers):
            args, kwargs = layer_args[i]
            out = layers[i](x, *args, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        return self._head(self._final_norm()(x))

    def _full(self, tokens: torch.Tensor, hooked: list[tuple[Site, Patch]]) -> torch.Tensor:
        handles = [_attach(s, _replace(patch)) for s, patch in hooked]
        try:
            return self.model(input_ids=tokens, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()

    def _final_norm(self) -> torch.nn.Module:
        assert self.family is not None  # tails run only on a model of a known family
        return self.model.get_submodule(self.family.final_norm)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The causal LM's head as its forward applies it (Gemma 2's final soft-capping included)."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _strip(hook: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if hook.endswith(suffix):
            return hook[: -len(suffix)], suffix[1:]
    return hook, "output"


def _has_module(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _find_layers(model: torch.nn.Module, n_layers: int) -> str | None:
    """The first ModuleList of `n_layers` modules: the decoder layers of an unknown family."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return name
    return None


def _attach(site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """A hook on `site` calling fn(activation) -> replacement or None."""
    assert isinstance(site, HFSite)  # this backend resolves every hook to one
    if site.io == "input":

        def pre(
            module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return site.module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        act = output[0] if isinstance(output, tuple) else output
        new = fn(act)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return site.module.register_forward_hook(post)


def _store(into: dict[str, torch.Tensor], key: str) -> Callable[[torch.Tensor], None]:
    def fn(act: torch.Tensor) -> None:
        into[key] = act

    return fn


def _replace(patch: Patch) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda act: apply(patch, act)


def _record(
    layer_args: dict[int, tuple[tuple, dict]], entries: dict[int, torch.Tensor], index: int
) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], None]:
    """Keep what the original forward passed to layer `index` (beside the residual)."""

    def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        entries[index] = hidden
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        layer_args[index] = (args[1:], rest)

    return pre


def _placement(model: torch.nn.Module) -> dict[str, str]:
    """Which device holds which modules: accelerate's `hf_device_map` where it placed them."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        groups: dict[str, list[str]] = {}
        for module, device in device_map.items():
            groups.setdefault(str(device), []).append(module or "<model>")
        return {device: ", ".join(mods) for device, mods in groups.items()}
    return {str(next(model.parameters()).device): "<model>"}


def load(source: str | Path, device: torch.device, dtype: torch.dtype, devices: list[torch.device]) -> HFBackend:
    """`AutoModelForCausalLM` from a local directory or a hub name; across `devices` with accelerate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shown = repr(str(source))
    kwargs: dict[str, Any] = {**dtype_kwarg(dtype), **NO_REMOTE_CODE}
    if devices:
        memory = {d.index or 0: torch.cuda.get_device_properties(d).total_memory for d in devices}
        kwargs.update(device_map="auto", max_memory=memory)
    try:
        with loading_checkpoint(source):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        where = (
            "cannot load as a Hugging Face causal LM"
            if isinstance(source, Path)
            else "not loadable from the Hugging Face hub"
        )
        raise SourceError(f"model {shown}: {where} ({first_line(err)})") from None
    tokenizer = None
    if isinstance(source, Path):
        tokenizer = AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE) if has_tokenizer(source) else None
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE)
        except (OSError, ValueError):
            tokenizer = None
    model.eval()
    if not devices:
        model.to(device)  # type: ignore[arg-type]  # transformers' stub of `to` takes the model as its first argument
    return HFBackend.wrap(model, tokenizer)
