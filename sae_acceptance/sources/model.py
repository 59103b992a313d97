"""Models: a hub name or a local Hugging Face checkpoint directory, behind a backend (`backends/`).

Weights are not processed by default (no LayerNorm folding, no centring): an SAE
must be evaluated on the activations it was trained on, and SAELens trains on
unprocessed models. An SAE's recorded `model_from_pretrained_kwargs` override
that default.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_acceptance.config import BACKENDS, eval_default, names_local_path
from sae_acceptance.errors import SourceError
from sae_acceptance.hooks import hook_layer  # noqa: F401  (callers import it from here)
from sae_acceptance.sources.backends import Backend, as_backend
from sae_acceptance.sources.backends.checkpoint import NotForTransformerLens
from sae_acceptance.sources.hub_calls import quiet_hub, say_hub_wait

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError(f"device {device!r} asked for, but CUDA is not available here")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype a settings name (`float32`, `bfloat16`, ...) stands for."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SourceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def processing_kwargs(recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """No processing, overridden by what the SAE recorded it was trained with."""
    return {**NO_PROCESSING, **(recorded or {})}


Devices = int | Sequence[str | int] | None


def load_model(
    name_or_path: str | Path,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    from_pretrained_kwargs: dict[str, Any] | None = None,
    devices: Devices = None,
) -> Any:
    """The TransformerLens model, in eval mode: a `HookedTransformer` on TransformerLens 3,
    a `TransformerBridge` on 4. `as_backend(model)` is its backend. Device and dtype default to
    `[eval]`'s."""
    return load_backend(name_or_path, device, dtype, from_pretrained_kwargs, "transformer_lens", devices).model


def load_backend(
    name_or_path: str | Path,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    from_pretrained_kwargs: dict[str, Any] | None = None,
    backend: str | None = None,
    devices: Devices = None,
) -> Backend:
    """A model behind the engine's interface, from a hub name or a local checkpoint directory.

    `backend`: `transformer_lens` (3.x `HookedTransformer`, or 4.x `TransformerBridge`
    where that is installed), `hf` (`AutoModelForCausalLM`, hooks by module path) or
    `auto` (TransformerLens where it can load the model, else Hugging Face).
    `devices` (a count, or a list of CUDA devices) places the model across GPUs.
    """
    backend = backend or eval_default("backend")
    if backend not in BACKENDS:
        raise SourceError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    kwargs = processing_kwargs(from_pretrained_kwargs)
    torch_device = resolve_device(device or eval_default("device"))
    torch_dtype = resolve_dtype(dtype or eval_default("dtype"))
    placement = _device_list(devices, torch_device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.is_dir():
        if path.exists():
            raise SourceError(f"model {name!r}: a file, expected a checkpoint directory")
        if names_local_path(name):
            raise SourceError(f"model {name!r}: no such directory")
    elif not (path / "config.json").exists():
        raise SourceError(f"model {name!r}: not a Hugging Face checkpoint directory (no config.json)")
    source = path if path.is_dir() else name
    if not isinstance(source, Path):
        say_hub_wait(f"model {name!r}")
    with warnings.catch_warnings(), nullcontext() if isinstance(source, Path) else quiet_hub():
        warnings.simplefilter("ignore", DeprecationWarning)
        if backend == "hf":
            return load_hf(source, torch_device, torch_dtype, kwargs, placement)
        try:
            return load_transformer_lens(source, torch_device, torch_dtype, kwargs, placement)
        except NotForTransformerLens as err:
            if backend == "transformer_lens":
                raise
            try:
                return load_hf(source, torch_device, torch_dtype, kwargs, placement)
            except SourceError as hf_err:
                raise SourceError(f"{err}; Hugging Face: {_after_name(hf_err)}") from None


def load_transformer_lens(
    source: str | Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any], devices: list[torch.device]
) -> Backend:
    """TransformerLens 3 or 4, whichever is installed.

    Each backend module imports its library's classes at the top, and TransformerLens 3's
    `HookedTransformer` does not exist in 4 (nor the bridge in 3): only the installed one is imported.
    """
    if transformer_lens_major() < 4:
        from sae_acceptance.sources.backends.transformer_lens import load

        return load(source, device, dtype, kwargs, devices)
    from sae_acceptance.sources.backends.bridge import load as load_bridge

    return load_bridge(source, device, dtype, kwargs, devices)


def transformer_lens_major() -> int:
    """The installed TransformerLens' major version (3: `HookedTransformer`, 4: `TransformerBridge`)."""
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


def load_hf(
    source: str | Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any], devices: list[torch.device]
) -> Backend:
    """A Hugging Face model as a backend; refused for an SAE trained on TransformerLens-processed
    weights (this backend runs the raw ones)."""
    # transformers' model classes, imported only when a model runs on this backend
    from sae_acceptance.sources.backends.hf import load

    if kwargs != NO_PROCESSING:
        changed = ", ".join(f"{k}={v}" for k, v in kwargs.items() if NO_PROCESSING.get(k) != v)
        raise SourceError(
            f"model {str(source)!r}: the SAE was trained on a TransformerLens-processed model ({changed}); "
            "the hf backend runs raw weights: use backend transformer_lens"
        )
    return load(source, device, dtype, devices)


def _after_name(err: SourceError) -> str:
    """An error's text without its leading `model '…': `."""
    text = str(err)
    return text.split(": ", 1)[1] if text.startswith("model ") and ": " in text else text


def _device_list(devices: Devices, device: torch.device) -> list[torch.device]:
    """`devices` as CUDA devices ([] for one device: `device`)."""
    if devices is None or devices == 1:
        return []
    if isinstance(devices, int):
        listed = [torch.device("cuda", i) for i in range(devices)]
    else:
        listed = [torch.device(f"cuda:{d}" if isinstance(d, int) else d) for d in devices]
    if device.type != "cuda" or any(d.type != "cuda" for d in listed):
        raise SourceError(f"devices = {devices!r}: placing a model across devices needs CUDA devices")
    available = torch.cuda.device_count()
    missing = [str(d) for d in listed if (d.index or 0) >= available]
    if missing:
        raise SourceError(f"devices = {devices!r}: {', '.join(missing)} not present ({available} CUDA devices here)")
    return listed


def hook_width(model: Any, hook_name: str) -> int:
    """Width of the (flat) activation at `hook_name`, or a clear error naming the closest valid hooks."""
    return as_backend(model).hook_width(hook_name)


def special_token_ids(model: Any) -> list[int]:
    """The tokenizer's BOS/EOS/PAD ids; without a tokenizer, the checkpoint config's."""
    return as_backend(model).special_token_ids()


class ModelCache:
    """Models loaded once per process, keyed by name, processing, device, dtype, backend and placement."""

    def __init__(self) -> None:
        self._backends: dict[tuple, Backend] = {}

    def backend(
        self, name: str, kwargs: dict[str, Any], device: str, dtype: str, backend: str, devices: Devices = None
    ) -> Backend:
        """The model behind its backend, loaded on the first ask."""
        placed = devices if devices is None or isinstance(devices, int) else tuple(devices)
        key = (name, tuple(sorted(kwargs.items())), device, dtype, backend, placed)
        if key not in self._backends:
            self._backends[key] = load_backend(name, device, dtype, kwargs, backend, devices)
        return self._backends[key]

    def get(self, name: str, kwargs: dict[str, Any], device: str, dtype: str) -> HookedTransformer:
        """The TransformerLens model itself (training and the PR profiler run it directly)."""
        return self.backend(name, kwargs, device, dtype, "transformer_lens").model
