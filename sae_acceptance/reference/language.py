"""A small synthetic language with structure a tiny transformer can learn.

Each document picks one of a few hidden topics; within a topic every word has
three likely successors. A model that infers the topic in context predicts the
next word with about 0.9 nats of loss, far below the 5.5 nats of guessing, so
patching a poor reconstruction into it costs measurable loss, as in a real LM.
Documents start with <bos> and end with <eos>, so the special-token rule has
something to exclude.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
BOS, EOS, PAD = 0, 1, 2
SUCCESSOR_PROBS = np.array([0.6, 0.3, 0.1])


class TopicLanguage:
    """A synthetic language: each document follows one topic's table of likely next words, so a
    small model learns structure an SAE can find, with no data to download."""

    def __init__(self, vocab_size: int, n_topics: int = 8, *, seed: int):
        rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        first_word = len(SPECIAL_TOKENS)
        words = np.arange(first_word, vocab_size)
        # successors[topic, word] -> 3 next words, in order of probability
        self.successors = rng.choice(words, size=(n_topics, vocab_size, 3))
        self.starts = rng.choice(words, size=(n_topics, 4))
        self.n_topics = n_topics

    def document(self, rng: np.random.Generator, min_len: int = 24, max_len: int = 160) -> np.ndarray:
        """One document: BOS, a random topic's chain of words of random length, EOS."""
        topic = rng.integers(self.n_topics)
        length = rng.integers(min_len, max_len)
        doc = [BOS, int(rng.choice(self.starts[topic]))]
        choices = rng.choice(3, size=length, p=SUCCESSOR_PROBS)
        for choice in choices:
            doc.append(int(self.successors[topic, doc[-1], choice]))
        doc.append(EOS)
        return np.asarray(doc, dtype=np.int64)

    def stream(self, seed: int) -> Iterator[np.ndarray]:
        """Documents without end, reproducible from `seed`."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.document(rng)

    def sequences(self, n: int, context_size: int, seed: int) -> np.ndarray:
        """[n, context_size] rows cut from the concatenated document stream."""
        need, parts, have = n * context_size, [], 0
        for doc in self.stream(seed):
            parts.append(doc)
            have += len(doc)
            if have >= need:
                break
        return np.concatenate(parts)[:need].reshape(n, context_size)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: `w17` <-> 17, with <bos>/<eos>/<pad> as special tokens."""
    # imported here: transformers takes seconds to import, and only a build or a test needs this
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<pad>"
    )
