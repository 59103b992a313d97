"""The embedded reference model: a tiny GPT-NeoX trained on `TopicLanguage`, with a canyon.

After training, one MLP's output weights gain a rank-one term that writes a
large, token-dependent multiple of the all-ones vector into the residual
stream. Every later LayerNorm subtracts the per-token mean, so the model's
outputs do not change; but from that block on the residual's covariance is
dominated by one direction: its participation ratio collapses, as in the
mid-layer "PR canyon" of real models, and R² there is inflated by a variance
that the model ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_acceptance.reference.language import TopicLanguage, build_tokenizer

if TYPE_CHECKING:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer


@dataclass(frozen=True)
class ReferenceModelSpec:
    """The embedded reference model's size, training and canyon: every number its build depends on."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_ctx: int = 128
    train_steps: int = 1500
    batch_size: int = 32
    context_size: int = 64
    lr: float = 3e-3
    canyon_block: int = 1  # resid_post of this block and later ones are in the canyon
    canyon_std: float = 20.0  # std of the injected all-ones coefficient
    seed: int = 0


def gpt_neox_config(spec: ReferenceModelSpec) -> GPTNeoXConfig:
    """The Hugging Face config of the reference model."""
    from transformers import GPTNeoXConfig  # slow to import: only a build needs it

    return GPTNeoXConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        intermediate_size=4 * spec.d_model,
        max_position_embeddings=spec.n_ctx,
        rotary_pct=0.25,  # type: ignore[call-arg]  # a legacy key: transformers maps it to partial_rotary_factor
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def train_reference_model(
    spec: ReferenceModelSpec, language: TopicLanguage, progress: bool = True
) -> GPTNeoXForCausalLM:
    """Next-token training on the language's stream; returns the HF model in eval mode."""
    from transformers import GPTNeoXForCausalLM  # slow to import: only a build needs it

    torch.manual_seed(spec.seed)
    model = GPTNeoXForCausalLM(gpt_neox_config(spec))
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, spec.lr, total_steps=spec.train_steps, pct_start=0.1)
    data = language.sequences(spec.train_steps * spec.batch_size, spec.context_size, seed=spec.seed + 1)
    bar = tqdm(range(spec.train_steps), desc="train reference LM", disable=not progress)
    model.train()
    for step in bar:
        batch = torch.from_numpy(data[step * spec.batch_size : (step + 1) * spec.batch_size])
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def inject_canyon(model: GPTNeoXForCausalLM, spec: ReferenceModelSpec, probe: torch.Tensor) -> float:
    """Add the LayerNorm-invisible direction at `spec.canyon_block`; returns the max logit change."""
    block = cast("GPTNeoXLayer", model.gpt_neox.layers[spec.canyon_block])  # a ModuleList's item
    before = model(input_ids=probe).logits
    hidden: list[torch.Tensor] = []
    handle = block.mlp.dense_4h_to_h.register_forward_hook(lambda mod, inp, out: hidden.append(inp[0]))
    model(input_ids=probe)
    handle.remove()
    generator = torch.Generator().manual_seed(spec.seed + 2)
    u = torch.randn(block.mlp.dense_4h_to_h.in_features, generator=generator)
    coefficient = hidden[0] @ u
    u *= spec.canyon_std / coefficient.std()
    ones = torch.ones(block.mlp.dense_4h_to_h.out_features)
    block.mlp.dense_4h_to_h.weight += torch.outer(ones, u)
    after = model(input_ids=probe).logits
    return float((after - before).abs().max())


def save_reference_model(model: GPTNeoXForCausalLM, spec: ReferenceModelSpec, out: Path) -> Path:
    """A `save_pretrained` checkpoint with its tokenizer: loadable offline by `load_model`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(spec.vocab_size).save_pretrained(out)
    return out


def mean_loss(model: GPTNeoXForCausalLM, tokens: np.ndarray) -> float:
    """The model's mean next-token loss on `tokens` ([n, ctx])."""
    with torch.no_grad():
        batch = torch.from_numpy(tokens)
        return float(model(input_ids=batch, labels=batch).loss)
