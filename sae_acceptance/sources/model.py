"""Models: a TransformerLens official name (hub) or a local Hugging Face checkpoint directory.

Weights are not processed by default (no LayerNorm folding, no centring): an SAE
must be evaluated on the activations it was trained on, and SAELens trains on
unprocessed models. An SAE's recorded `model_from_pretrained_kwargs` override
that default.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sae_acceptance.errors import SourceError

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
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SourceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def processing_kwargs(recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """No processing, overridden by what the SAE recorded it was trained with."""
    return {**NO_PROCESSING, **(recorded or {})}


def load_model(
    name_or_path: str | Path,
    device: str = "auto",
    dtype: str | torch.dtype = "float32",
    from_pretrained_kwargs: dict[str, Any] | None = None,
):
    """A HookedTransformer from a hub name or a local checkpoint directory, in eval mode."""

    kwargs = processing_kwargs(from_pretrained_kwargs)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    path = Path(name_or_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if path.is_dir():
            model = _load_local(path, torch_dtype, kwargs)
        elif path.exists():
            raise SourceError(f"model {name_or_path!r}: a file, expected a checkpoint directory")
        else:
            model = _load_hub(str(name_or_path), torch_device, torch_dtype, kwargs)
    model.eval()
    return model.to(torch_device, print_details=False)


def _load_hub(name: str, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]):
    from transformer_lens import HookedTransformer

    try:
        return HookedTransformer.from_pretrained(name, device=device, dtype=dtype, **kwargs)
    except ValueError as err:  # TransformerLens: not an official model name
        raise SourceError(
            f"model {name!r}: not a local checkpoint directory and not a TransformerLens model name ({err})"
        ) from None
    except OSError as err:  # hub unreachable, or the repository is missing
        raise SourceError(f"model {name!r}: cannot download it from the hub ({err})") from None


def _load_local(path: Path, dtype: torch.dtype, kwargs: dict[str, Any]):
    """Offline: a `save_pretrained` directory, loaded through TransformerLens' own converters."""
    from transformer_lens import HookedTransformer, loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise SourceError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        with _quiet_transformers():
            hf_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
        cfg = loading.get_pretrained_model_config(str(path), dtype=dtype, **_cfg_kwargs(kwargs))
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        raise SourceError(f"{path}: cannot load as a local checkpoint ({err})") from None
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model)
    model.load_and_process_state_dict(
        state,
        fold_ln=kwargs["fold_ln"],
        center_writing_weights=kwargs["center_writing_weights"],
        center_unembed=kwargs["center_unembed"],
        fold_value_biases=kwargs["fold_value_biases"],
    )
    return model.to(dtype, print_details=False)


@contextmanager
def _quiet_transformers():
    """No "Loading weights" bar for a local checkpoint: it takes seconds, and logs read better without."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _cfg_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The config-level part of the processing kwargs (fold_ln changes the LN type)."""
    return {"fold_ln": kwargs["fold_ln"]}


def model_identity(name_or_path: str | Path | None) -> str | None:
    """What a model *is*, for baselines and caches: a hub name as given; a local checkpoint
    by a hash of its config and weight files' contents (a retrained checkpoint of the same
    shape is another model)."""
    if name_or_path is None or not Path(name_or_path).is_dir():
        return None if name_or_path is None else str(name_or_path)
    path = Path(name_or_path).resolve()
    files = [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.bin"))]
    stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())
    return _content_hash(stamps)


@functools.lru_cache(maxsize=32)
def _content_hash(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the files' names and bytes; cached while their sizes and times stand."""
    digest = hashlib.sha256()
    for name, _, _ in stamps:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"local:{digest.hexdigest()[:16]}"


def hook_width(model, hook_name: str) -> int:
    """Width of the activation at `hook_name`, or a clear error listing the closest valid names."""
    if hook_name not in model.hook_dict:
        close = difflib.get_close_matches(hook_name, list(model.hook_dict), n=5, cutoff=0.5)
        hint = f"; closest valid hooks: {', '.join(close)}" if close else ""
        raise SourceError(f"hook {hook_name!r} does not exist in the model{hint}")
    layer = hook_layer(hook_name)
    with torch.inference_mode():
        probe = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
        stop = layer + 1 if layer is not None else None
        _, cache = model.run_with_cache(probe, names_filter=hook_name, stop_at_layer=stop)
    return int(cache[hook_name][0, 0].numel())


def hook_layer(hook_name: str) -> int | None:
    """Block index of `blocks.{L}.…` hooks; None for hooks outside the blocks."""
    parts = hook_name.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def special_token_ids(model) -> list[int]:
    """The tokenizer's BOS/EOS/PAD ids (none without a tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return []
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return sorted(i for i in ids if i is not None)


class ModelCache:
    """Models loaded once per process, keyed by name, processing, device and dtype."""

    def __init__(self) -> None:
        self._models: dict[tuple, Any] = {}

    def get(self, name: str, kwargs: dict[str, Any], device: str, dtype: str):
        key = (name, json.dumps(kwargs, sort_keys=True), device, dtype)
        if key not in self._models:
            self._models[key] = load_model(name, device=device, dtype=dtype, from_pretrained_kwargs=kwargs)
        return self._models[key]
