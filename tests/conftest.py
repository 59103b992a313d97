"""Shared fixtures: a tiny GPT-NeoX checkpoint on disk, tokens, and SAEs with known behaviour.

Everything is built locally with fixed seeds: no hub, no network.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

# No test may reach a hub: set before the Hugging Face libraries read their configuration.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Hermetic against the CI that runs the suite: no outer run id, step summary or Actions switch leaks in.
os.environ.pop("GITHUB_ACTIONS", None)
os.environ.pop("GITHUB_STEP_SUMMARY", None)
os.environ.pop("GITHUB_RUN_ID", None)
os.environ.pop("SLURM_ARRAY_JOB_ID", None)

import datasets  # noqa: F401  imported once here: pytester's in-process runs must not re-register its Arrow types
import numpy as np
import pytest
import torch
import transformer_lens  # noqa: F401  (likewise: torch ops may be registered only once per process)
import transformers  # noqa: F401

from sae_acceptance.reference.language import TopicLanguage, build_tokenizer
from sae_acceptance.sources.sae import SAE

pytest_plugins = ["pytester"]

D_MODEL, N_LAYERS, VOCAB, N_CTX = 32, 3, 64, 32
REPO = Path(__file__).resolve().parents[1]


def build_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random-weight GPT-NeoX saved with `save_pretrained`, plus its tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=4 * D_MODEL,
        max_position_embeddings=N_CTX,
        rotary_pct=0.25,
        initializer_range=0.3,  # peaky next-token distributions: patching costs real loss
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    GPTNeoXForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    build_tokenizer(VOCAB).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from sae_acceptance.sources.model import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    """24 sequences of 16 tokens, with <bos>/<eos> inside (special tokens to exclude)."""
    return torch.from_numpy(TopicLanguage(VOCAB, n_topics=4, seed=0).sequences(24, 16, seed=1))


@pytest.fixture(scope="session")
def tiny_tokens_file(tmp_path_factory, tiny_tokens) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, TopicLanguage(VOCAB, n_topics=4, seed=0).sequences(64, 16, seed=1))
    return path


def identity_sae(d: int = D_MODEL, hook: str | None = None) -> SAE:
    """relu(x) − relu(−x) = x exactly: a perfect reconstruction."""
    eye = torch.eye(d)
    return SAE(
        torch.cat([eye, -eye], 1),
        torch.zeros(2 * d),
        torch.cat([eye, -eye], 0),
        torch.zeros(d),
        architecture="standard",
        apply_b_dec_to_input=False,
        hook_name=hook,
    )


def zero_sae(d: int = D_MODEL, hook: str | None = None) -> SAE:
    """Reconstructs 0 everywhere: patching it is zero-ablation."""
    return SAE(
        torch.zeros(d, 4), torch.zeros(4), torch.zeros(4, d), torch.zeros(d), architecture="standard", hook_name=hook
    )


def random_topk_sae(
    d: int = D_MODEL, d_sae: int = 128, k: int = 4, seed: int = 0, hook: str | None = None, scale: float = 1.0
) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, d, generator=g), dim=1) * scale
    return SAE(
        w_dec.T.clone(),
        torch.zeros(d_sae),
        w_dec,
        torch.randn(d, generator=g) * 0.1,
        architecture="topk",
        k=k,
        hook_name=hook,
        model_name="tiny",
    )
