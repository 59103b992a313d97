"""Eval tokens: a `.npy` int array, or a Hugging Face dataset (hub, streamed, or local).

The eval set is `n_sequences` rows of `context_size` tokens, after skipping
`skip` sequences (so eval data can be held out from the training stream). Rows
are taken as given: no BOS is prepended. A dataset's documents are
concatenated (text is tokenized once, each document followed by EOS when the
tokenizer has one) and cut into rows, the way SAELens streams its data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sae_acceptance.config import eval_default
from sae_acceptance.errors import SourceError
from sae_acceptance.io import regular_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKEN_COLUMNS = ("tokens", "input_ids")


def load_tokens(
    data: str | Path,
    n_sequences: int,
    context_size: int,
    skip: int = 0,
    tokenizer: Any = None,
    column: str | None = None,
    split: str | None = None,
) -> torch.Tensor:
    """[n_sequences, context_size] int64 tokens from `data`, or one clear error (a dataset's
    `split` defaults to `[eval]`'s)."""
    path = Path(data).expanduser()
    if path.suffix == ".npy":
        if not path.exists():
            raise SourceError(f"{path}: no such token file, expected a .npy file")
        regular_file(path, "a .npy file", SourceError)
        return _from_npy(path, n_sequences, context_size, skip)
    if path.exists() and not path.is_dir():
        raise SourceError(f"{path}: not a token file; expected a .npy array or a dataset directory")
    rows = _dataset_rows(str(data), split or eval_default("split"), column, tokenizer)
    return _take(_chunk(rows, context_size), n_sequences, skip, str(data), context_size)


def _from_npy(path: Path, n_sequences: int, context_size: int, skip: int) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, EOFError, OSError) as err:
        # numpy suggests allow_pickle=True for any file it cannot read: never the fix here
        raise SourceError(f"{path}: {_npy_problem(path, err)}; expected a .npy array of token ids") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise SourceError(f"{path}: token array has dtype {array.dtype}, expected integers")
    if array.ndim == 0 or array.size == 0:
        raise SourceError(f"{path}: token array has shape {array.shape}, expected [n_seq, ctx] or [n] with tokens")
    if array.ndim == 1:
        return _take(_chunk([array], context_size), n_sequences, skip, str(path), context_size)
    if array.ndim != 2:
        raise SourceError(f"{path}: token array has shape {array.shape}, expected [n_seq, ctx] or [n]")
    if array.shape[1] < context_size:
        raise SourceError(f"{path}: rows have {array.shape[1]} tokens, fewer than context_size={context_size}")
    if array.shape[0] < skip + n_sequences:
        raise SourceError(
            f"{path}: has {array.shape[0]} sequences, fewer than skip + n_sequences = {skip} + {n_sequences}"
        )
    rows = np.asarray(array[skip : skip + n_sequences, :context_size], dtype=np.int64)
    return torch.from_numpy(rows.copy())


def _npy_problem(path: Path, err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"cannot read ({err.strerror})"
    with path.open("rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":
        return "not a .npy file (no NumPy header)"
    return (
        "holds Python objects (refused: never unpickled)"
        if "object" in str(err).lower() or "pickle" in str(err)
        else "a damaged .npy file"
    )


def _dataset_rows(
    name: str, split: str, column: str | None, tokenizer: PreTrainedTokenizerBase | None
) -> Iterator[np.ndarray]:
    """Token rows of a dataset, streamed: a local `save_to_disk` folder, local files, or the hub."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise SourceError(f"data {name!r}: no split {split!r} (has {', '.join(dataset)})")
                dataset = dataset[split]
        else:
            # no loading script runs (datasets before 4 ran one, or asked on standard input)
            dataset = datasets.load_dataset(name, split=split, streaming=True, trust_remote_code=False)
        first = next(iter(dataset), None)  # a streamed dataset opens its files only here
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SourceError(f"data {name!r}: cannot open as a dataset ({detail})") from None
    if first is None:
        raise SourceError(f"data {name!r}: the dataset is empty")
    column = column or next((c for c in (*TOKEN_COLUMNS, "text") if c in first), None)
    if column is None or column not in first:
        raise SourceError(f"data {name!r}: no column {column or 'tokens/input_ids/text'} (has {', '.join(first)})")
    if column == "text" or isinstance(first[column], str):
        if tokenizer is None:
            raise SourceError(f"data {name!r}: column {column!r} holds text, and the model has no tokenizer")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return (
            np.asarray(tokenizer(row[column], add_special_tokens=False)["input_ids"] + eos, dtype=np.int64)
            for row in dataset
        )
    return (np.asarray(row[column], dtype=np.int64) for row in dataset)


def _chunk(rows: Iterable[np.ndarray], context_size: int) -> Iterator[np.ndarray]:
    """Concatenate rows and cut them into sequences of `context_size` (the tail is dropped)."""
    pending = np.empty(0, dtype=np.int64)
    for row in rows:
        pending = np.concatenate([pending, np.asarray(row, dtype=np.int64).ravel()])
        while len(pending) >= context_size:
            yield pending[:context_size]
            pending = pending[context_size:]


def _take(sequences: Iterator[np.ndarray], n: int, skip: int, name: str, context_size: int) -> torch.Tensor:
    taken, seen = [], 0
    for seq in sequences:
        seen += 1
        if seen > skip:
            taken.append(seq)
        if len(taken) == n:
            return torch.from_numpy(np.stack(taken))
    raise SourceError(
        f"data {name!r}: only {seen} sequences of {context_size} tokens, fewer than skip + n_sequences = {skip} + {n}"
    )


def counted_mask(tokens: torch.Tensor, excluded_ids: Iterable[int]) -> torch.Tensor:
    """True where a token counts: not one of the excluded (special) token ids."""
    excluded = torch.tensor(sorted(set(excluded_ids)), dtype=tokens.dtype)
    if excluded.numel() == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, excluded)


def fingerprint(tokens: torch.Tensor) -> str:
    """Content hash of the eval tokens (shape and values), for reports and baselines."""
    array = np.ascontiguousarray(tokens.cpu().numpy().astype("<i8"))
    digest = hashlib.sha256(str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()[:16]
