"""Eval tokens from every source the gate reads, against an independent cut of the same stream.

A dataset's documents are concatenated (text tokenized once, each document followed
by EOS) and cut into rows of `context_size`; `skip` rows are dropped first. The hub
path is `datasets.load_dataset(name, streaming=True)`, the same call that reads a
local folder of data files here.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from sae_acceptance.errors import SourceError
from sae_acceptance.reference.language import EOS, TopicLanguage, build_tokenizer
from sae_acceptance.sources.tokens import counted_mask, fingerprint, load_tokens

VOCAB, CTX = 64, 16


@pytest.fixture(scope="module")
def documents() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    language = TopicLanguage(VOCAB, n_topics=4, seed=0)
    return [language.document(rng, min_len=5, max_len=40) for _ in range(60)]


def expected_rows(docs: list[np.ndarray], n: int, skip: int) -> np.ndarray:
    """The independent computation: concatenate, cut into rows, drop `skip` rows, keep `n`."""
    flat = np.concatenate(docs)
    rows = flat[: len(flat) // CTX * CTX].reshape(-1, CTX)
    return rows[skip : skip + n]


def test_npy_rows_skip_and_truncation(tmp_path):
    rows = np.arange(40 * 20, dtype=np.int32).reshape(40, 20)
    np.save(tmp_path / "t.npy", rows)
    got = load_tokens(tmp_path / "t.npy", n_sequences=5, context_size=CTX, skip=3)
    assert got.dtype == torch.int64 and got.tolist() == rows[3:8, :CTX].tolist()
    np.save(tmp_path / "flat.npy", rows.ravel())  # a 1-D stream is cut into rows
    flat = load_tokens(tmp_path / "flat.npy", n_sequences=4, context_size=CTX, skip=2)
    assert flat.tolist() == rows.ravel()[2 * CTX : 6 * CTX].reshape(4, CTX).tolist()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((10, CTX), dtype=np.float32), "dtype float32, expected integers"),
        (np.zeros((10, 8), dtype=np.int64), "rows have 8 tokens, fewer than context_size=16"),
        (np.zeros((10, CTX), dtype=np.int64), "has 10 sequences, fewer than skip + n_sequences = 4 + 8"),
        (np.zeros((2, 3, CTX), dtype=np.int64), "expected [n_seq, ctx] or [n]"),
    ],
)
def test_npy_bad_input_is_one_clear_error(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(SourceError, match=rf"bad\.npy: .*{re.escape(message)}"):
        load_tokens(tmp_path / "bad.npy", n_sequences=8, context_size=CTX, skip=4)


def test_missing_token_file(tmp_path):
    with pytest.raises(SourceError, match="nothing.npy: no such token file"):
        load_tokens(tmp_path / "nothing.npy", 4, CTX)


@pytest.mark.parametrize("column", ["tokens", "input_ids"])
def test_saved_dataset_with_a_token_column(tmp_path, documents, column):
    import datasets

    datasets.Dataset.from_dict({column: [d.tolist() for d in documents]}).save_to_disk(tmp_path / "ds")
    got = load_tokens(tmp_path / "ds", n_sequences=10, context_size=CTX, skip=7)
    assert got.tolist() == expected_rows(documents, 10, 7).tolist()


def test_dataset_files_with_a_text_column_are_tokenized_once(tmp_path, documents):
    """Local JSON-lines files through `load_dataset(..., streaming=True)`: the hub's code path."""
    import datasets

    folder = tmp_path / "texts"
    folder.mkdir()
    texts = [" ".join(f"w{t}" for t in d[1:-1]) for d in documents]  # words only, no specials
    datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).to_json(folder / "part-0.jsonl")
    tokenizer = build_tokenizer(VOCAB)
    got = load_tokens(folder, n_sequences=12, context_size=CTX, skip=2, tokenizer=tokenizer)
    with_eos = [np.append(d[1:-1], EOS) for d in documents]  # each document followed by EOS
    assert got.tolist() == expected_rows(with_eos, 12, 2).tolist()
    with pytest.raises(SourceError, match="holds text, and the model has no tokenizer"):
        load_tokens(folder, 4, CTX)


def test_dataset_errors_name_the_data_and_what_is_missing(tmp_path, documents):
    import datasets

    datasets.Dataset.from_dict({"ids": [d.tolist() for d in documents]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(SourceError, match=r"no column tokens/input_ids/text \(has ids\)"):
        load_tokens(tmp_path / "ds", 4, CTX)
    assert load_tokens(tmp_path / "ds", 4, CTX, column="ids").tolist() == expected_rows(documents, 4, 0).tolist()
    total = sum(len(d) for d in documents) // CTX
    with pytest.raises(SourceError, match=rf"only {total} sequences of 16 tokens, fewer than skip \+ n_sequences"):
        load_tokens(tmp_path / "ds", total, CTX, skip=1, column="ids")


def test_counted_mask_and_fingerprint():
    tokens = torch.tensor([[0, 5, 6, 1], [7, 2, 8, 9]])
    assert counted_mask(tokens, [0, 1, 2]).tolist() == [[False, True, True, False], [True, False, True, True]]
    assert counted_mask(tokens, []).all()
    assert fingerprint(tokens) == fingerprint(tokens.clone().to(torch.int32))  # content, not dtype
    assert fingerprint(tokens) != fingerprint(tokens.flip(0))
    assert fingerprint(tokens) != fingerprint(tokens.reshape(4, 2))  # shape counts too


def test_a_saved_dataset_dict_without_the_split_names_the_splits(tmp_path, documents):
    import datasets

    rows = datasets.Dataset.from_dict({"tokens": [d.tolist() for d in documents]})
    datasets.DatasetDict({"validation": rows}).save_to_disk(tmp_path / "dd")
    with pytest.raises(SourceError, match=r"no split 'train' \(has validation\)"):
        load_tokens(tmp_path / "dd", 4, CTX)
    got = load_tokens(tmp_path / "dd", 4, CTX, split="validation")
    assert got.tolist() == expected_rows(documents, 4, 0).tolist()
