"""Facts about a Hugging Face checkpoint that every backend's loader needs."""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from sae_acceptance.errors import SAEAcceptanceError, SourceError
from sae_acceptance.io import read_json, regular_file
from sae_acceptance.sources.formats.tensors import pickle_refused

# Every transformers loader gets this: a checkpoint's own code (`auto_map`) is never run, and
# never asked about on standard input.
NO_REMOTE_CODE = {"trust_remote_code": False}
# What transformers raises for weights it refuses to unpickle, or a damaged safetensors file.
UNREADABLE_WEIGHTS = (pickle.UnpicklingError, SafetensorError)
# What transformers reads from a checkpoint folder: configs, weights, tokenizer files.
CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".pt")

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


class NotForTransformerLens(SourceError):
    """TransformerLens cannot load this model (unknown name or architecture): `auto` tries Hugging Face."""


def has_tokenizer(path: Path) -> bool:
    """Whether a checkpoint directory ships tokenizer files."""
    return any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    )


def check_checkpoint(path: Path) -> None:
    """Refuse, before transformers opens it, a local checkpoint with a file it would read that is
    not a regular file (a FIFO hangs a reader, `/dev/zero` never ends), or that could only load
    by running code it ships (`auto_map` naming a model or tokenizer class transformers does not
    have). Where transformers has the class built in, `NO_REMOTE_CODE` loads that one instead."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    checks = (
        ("config.json", "model_type", lambda name: isinstance(name, str) and name in CONFIG_MAPPING),
        (
            "tokenizer_config.json",
            "tokenizer_class",
            lambda name: isinstance(name, str) and bool(tokenizer_class_from_name(name)),
        ),
    )
    for file in path.iterdir():
        if file.suffix in CHECKPOINT_SUFFIXES and not file.is_dir():
            regular_file(file, f"a checkpoint's {file.suffix} file", SourceError)
    for file_name, field, built_in in checks:
        file = path / file_name
        if file_name != "config.json" and not file.exists():
            continue
        config = read_json(file, f"a checkpoint's {file_name}", error=SourceError)
        if not isinstance(config, dict):
            raise SourceError(f"{file}: expected a JSON object, got {type(config).__name__}")
        if config.get("auto_map") and not built_in(config.get(field)):
            raise SourceError(
                f"{file}: auto_map asks to run the checkpoint's own code for {field} {config.get(field)!r} "
                "(not built into transformers); the gate never runs a checkpoint's code"
            )


def weights_refused(source: str | Path, err: Exception) -> SAEAcceptanceError:
    """The one line for checkpoint weights transformers could not read safely (`UNREADABLE_WEIGHTS`):
    a pickle holding more than tensors, or a damaged safetensors file."""
    suffixes = (".bin", ".pt") if isinstance(err, pickle.UnpicklingError) else (".safetensors",)
    files = sorted(f for f in Path(source).iterdir() if f.suffix in suffixes) if isinstance(source, Path) else []
    where = str(files[0]) if len(files) == 1 else f"model {str(source)!r}"
    if isinstance(err, pickle.UnpicklingError):
        return pickle_refused(where, err, SourceError)
    return SourceError(f"{where}: not a readable safetensors file ({first_line(err)})")


def checkpoint_special_ids(config: PretrainedConfig) -> list[int]:
    """BOS/EOS/PAD ids a Hugging Face config names (the special tokens without a tokenizer)."""
    ids: set[int] = set()
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, field, None)
        ids.update(value if isinstance(value, list | tuple) else [] if value is None else [value])
    return sorted(ids)


@contextmanager
def loading_checkpoint(source: str | Path) -> Iterator[None]:
    """Around every transformers load of a model: a local checkpoint is checked first
    (`check_checkpoint`), weights transformers cannot read safely are one line
    (`weights_refused`), and there is no "Loading weights" bar (it takes seconds, and logs read
    better without)."""
    from transformers.utils import logging as hf_logging

    if isinstance(source, Path):
        check_checkpoint(source)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    except UNREADABLE_WEIGHTS as err:
        raise weights_refused(source, err) from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def closest_names(name: str, names: Sequence[str]) -> str:
    """` (closest: a, b, c)`, at most three, or nothing."""
    lookup = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lookup), n=3, cutoff=0.6)
    return f" (closest: {', '.join(lookup[c] for c in close)})" if close else ""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line: errors here are one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`'s dtype argument: `dtype` from transformers 4.56 on, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}
