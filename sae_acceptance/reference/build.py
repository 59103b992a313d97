"""Build the embedded reference: model checkpoint, eval tokens, a text dataset, TopK SAEs.

`sae-acceptance build-reference --out reference` rebuilds what the repository
ships (about three minutes on a 2-core CPU). The repository's thresholds.toml
gates these SAEs: at the early layer a TopK SAE passes; at a canyon layer a
small-k SAE with an excellent-looking R² fails on patched loss.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sae_acceptance.hooks import HookPoint
from sae_acceptance.io import read_json, write_json
from sae_acceptance.reference.language import TopicLanguage
from sae_acceptance.reference.model import (
    ReferenceModelSpec,
    inject_canyon,
    mean_loss,
    save_reference_model,
    train_reference_model,
)
from sae_acceptance.sources.model import load_model, special_token_ids
from sae_acceptance.sources.tokens import counted_mask
from sae_acceptance.train.grid import train_at_hook
from sae_acceptance.train.sweep_profile import load_profile

EVAL_SEED, SAE_TRAIN_SEED, PROBE_SEED = 1_000, 2_000, 3_000
EVAL_SEQUENCES = 256
SAE_TRAIN_SEQUENCES = 8_192  # 524k tokens of context 64
SAE_GRID = {0: (4, 32), 2: (4, 32)}  # k values by block: resid_post before and in the canyon
SAE_SETTINGS_PROFILE = "tiny"  # the SAEs train as the tiny sweep does: its [train] table


def reference_sae_name(layer: int, k: int) -> str:
    """The name of the embedded reference SAE at `layer` with TopK `k`."""
    return f"L{layer}-k{k}"


def build_reference(
    out: Path, spec: ReferenceModelSpec | None = None, progress: bool = True, reuse_model: bool = False
) -> Path:
    """Everything under `out`; `reuse_model` keeps an existing checkpoint and retrains only the SAEs.
    With `progress`, each stage says what it does before its bar (a build takes minutes)."""

    def stage(line: str) -> None:
        if progress:
            print(f"build-reference: {line}", flush=True)

    spec = spec or ReferenceModelSpec()
    torch.manual_seed(spec.seed)
    out.mkdir(parents=True, exist_ok=True)
    language = TopicLanguage(spec.vocab_size, seed=spec.seed)
    eval_tokens = language.sequences(EVAL_SEQUENCES, spec.context_size, seed=EVAL_SEED)
    np.save(out / "tokens.npy", eval_tokens.astype(np.int32))
    manifest_path = out / "manifest.json"
    stage(f"eval tokens written to {out / 'tokens.npy'}")
    if reuse_model and manifest_path.exists():
        stage(f"keeping the model in {out / 'model'}")
        previous = read_json(manifest_path, "the reference manifest")
        loss, drift = previous["eval_loss_nats"], previous["canyon_max_logit_change"]
    else:
        stage(f"training the reference model ({spec.n_layers} layers, {spec.train_steps} steps)")
        hf_model = train_reference_model(spec, language, progress)
        loss = mean_loss(hf_model, eval_tokens)
        stage(f"injecting the canyon from block {spec.canyon_block} on; saving the model to {out / 'model'}")
        probe = torch.from_numpy(language.sequences(32, spec.context_size, PROBE_SEED))
        drift = inject_canyon(hf_model, spec, probe)
        save_reference_model(hf_model, spec, out / "model")

    model = load_model(out / "model", device="cpu")
    train_tokens = torch.from_numpy(language.sequences(SAE_TRAIN_SEQUENCES, spec.context_size, SAE_TRAIN_SEED))
    np.save(out / "train_tokens.npy", train_tokens.numpy().astype(np.int16))  # the tiny sweep's stream
    settings = load_profile(SAE_SETTINGS_PROFILE).train
    for layer, ks in SAE_GRID.items():
        stage(f"training SAEs at {HookPoint.at(layer).name}: k = {', '.join(map(str, ks))}")
        cfg = settings.model_copy(update={"k": max(ks), "seed": spec.seed})
        train_at_hook(
            model,
            "reference/model",
            train_tokens,
            HookPoint.at(layer).name,
            list(ks),
            cfg,
            out={k: out / "saes" / reference_sae_name(layer, k) for k in ks},
            buffer_tokens=65_536,
            metadata={
                "context_size": spec.context_size,
                "prepend_bos": False,
                "dataset_path": "sae_acceptance.reference.language.TopicLanguage",
            },
            progress=progress,
        )
    manifest = {
        "spec": asdict(spec),
        "eval_loss_nats": loss,
        "canyon_max_logit_change": drift,
        "eval_sequences": EVAL_SEQUENCES,
        "sae_train_tokens": int(counted_mask(train_tokens, special_token_ids(model)).sum()),
        "saes": [reference_sae_name(layer, k) for layer, ks in SAE_GRID.items() for k in ks],
    }
    write_json(manifest_path, manifest)
    return out
