"""Facts about a Hugging Face checkpoint that every backend's loader needs."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from sae_acceptance.errors import SourceError


class NotForTransformerLens(SourceError):
    """TransformerLens cannot load this model (unknown name or architecture): `auto` tries Hugging Face."""


def has_tokenizer(path: Path) -> bool:
    """Whether a checkpoint directory ships tokenizer files."""
    return any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    )


def checkpoint_special_ids(config) -> list[int]:
    """BOS/EOS/PAD ids a Hugging Face config names (the special tokens without a tokenizer)."""
    ids: set[int] = set()
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, field, None)
        ids.update(value if isinstance(value, list | tuple) else [] if value is None else [value])
    return sorted(ids)


@contextmanager
def quiet_transformers():
    """No "Loading weights" bar for a local checkpoint: it takes seconds, and logs read better without."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
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


def dtype_kwarg(dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` from transformers 4.56 on, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}
