"""SAEBench's core eval output: one file per SAE, in sae-bench 0.6.0's schema, from a report.

SAEBench's graphing code and Neuronpedia's uploads read these files. The numbers
are the report's own, pooled over the whole eval set; where SAEBench's core eval
defines a number differently the file holds SAEBench's definition
(`explained_variance`, docs/metrics.md), except `mse`, which is the
per-token squared error (`mse_sum`): SAEBench divides it by a batch's token
count once more. NaN is written as -1, as SAEBench writes it. The project's own
diagnostics go in `eval_result_unstructured`.
"""

from __future__ import annotations

import math
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from sae_acceptance import __version__ as PROJECT_VERSION
from sae_acceptance.io import OutputError, to_json, write_atomic
from sae_acceptance.results import EvalReport, Latents, SAEResult
from sae_acceptance.sources.spec import SAELENS_PREFIX, parse_saelens

DECIMALS = 10  # per-latent details, as SAEBench rounds them
# (group, SAEBench's name, the report's metric)
METRICS = (
    ("model_behavior_preservation", "kl_div_score", "kl_div_score"),
    ("model_behavior_preservation", "kl_div_with_ablation", "kl_ablate"),
    ("model_behavior_preservation", "kl_div_with_sae", "kl_div"),
    ("model_performance_preservation", "ce_loss_score", "ce_loss_score"),
    ("model_performance_preservation", "ce_loss_with_ablation", "ce_ablate"),
    ("model_performance_preservation", "ce_loss_with_sae", "ce_recon"),
    ("model_performance_preservation", "ce_loss_without_sae", "ce_orig"),
    ("reconstruction_quality", "explained_variance", "explained_variance"),
    ("reconstruction_quality", "explained_variance_legacy", "explained_variance_legacy"),
    ("reconstruction_quality", "mse", "mse_sum"),
    ("reconstruction_quality", "cossim", "cosine"),
    ("shrinkage", "l2_norm_in", "l2_norm_in"),
    ("shrinkage", "l2_norm_out", "l2_norm_out"),
    ("shrinkage", "l2_ratio", "l2_ratio"),
    ("shrinkage", "relative_reconstruction_bias", "relative_reconstruction_bias"),
    ("sparsity", "l0", "l0"),
    ("sparsity", "l1", "l1"),
    ("misc_metrics", "freq_over_1_percent", "freq_over_1_percent"),
    ("misc_metrics", "freq_over_10_percent", "freq_over_10_percent"),
    ("misc_metrics", "normalized_freq_over_1_percent", "normalized_freq_over_1_percent"),
    ("misc_metrics", "normalized_freq_over_10_percent", "normalized_freq_over_10_percent"),
    ("misc_metrics", "average_max_encoder_cosine_sim", "max_encoder_cosine"),
    ("misc_metrics", "average_max_decoder_cosine_sim", "max_decoder_cosine"),
    ("misc_metrics", "frac_alive", "alive_frac"),
)
# The project's diagnostics, carried in `eval_result_unstructured`.
DIAGNOSTICS = ("ce_rec", "delta_ce", "error_kl_ratio", "grad_alignment", "delta_ce_linear", "duplicate_frac", "r2")
# Per-latent details: SAEBench's name, the weight statistic (`weights.latent_weights`).
DETAILS = (
    ("encoder_bias", "encoder_bias"),
    ("encoder_norm", "encoder_norm"),
    ("encoder_decoder_cosine_sim", "encoder_decoder_cosine"),
    ("max_decoder_cosine_sim", "max_decoder_cosine"),
    ("max_encoder_cosine_sim", "max_encoder_cosine"),
)


def file_name(release: str, sae_id: str) -> str:
    """SAEBench's name for a core result: `<release>_<sae_id>_eval_results.json`, "/" as "_"."""
    return f"{release}_{sae_id}_eval_results.json".replace("/", "_")


def identity(result: SAEResult) -> tuple[str, str]:
    """(release, SAE id) as SAEBench names an SAE: a SAELens release's own, else the thresholds
    file's stem and the entry's name."""
    if result.path.startswith(SAELENS_PREFIX):
        return parse_saelens(result.path)
    return (Path(result.source.file).stem if result.source else "sae-acceptance"), result.name


def document(result: SAEResult, report: EvalReport) -> dict[str, Any]:
    """One SAE's core eval output, as SAEBench writes it."""
    latents = result.latents
    if latents is None or latents.fired_sequences is None or not latents.weights:
        raise OutputError(
            f"{result.name}: a SAEBench file needs the per-latent statistics of [eval] diagnostics' "
            "saebench part (on by default)"
        )
    settings = report.settings
    groups: dict[str, dict[str, Any]] = {}
    for group, name, metric in METRICS:
        measured = result.metrics.get(metric)
        groups.setdefault(group, {})[name] = _number(math.nan if measured is None else measured.value)
    positions = int(settings["n_sequences"]) * int(settings["context_size"])
    groups["token_stats"] = {
        "total_tokens_eval_reconstruction": positions,
        "total_tokens_eval_sparsity_variance": positions,
    }
    release, sae_id = identity(result)
    batches = math.ceil(int(settings["n_sequences"]) / int(settings["batch_size"]))
    return {
        "eval_type_id": "core",
        "eval_config": {
            "model_name": result.model,
            "llm_dtype": settings.get("dtype"),
            "batch_size_prompts": settings.get("batch_size"),
            "n_eval_reconstruction_batches": batches,
            "n_eval_sparsity_variance_batches": batches,
            "dataset": settings.get("data"),
            "context_size": settings.get("context_size"),
            "compute_kl": True,
            "compute_ce_loss": True,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": True,
            "verbose": False,
        },
        "eval_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sae-acceptance:{result.tokens_fingerprint}:{result.name}")),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": groups,
        "eval_result_details": _details(latents),
        "sae_bench_commit_hash": f"sae-acceptance-{PROJECT_VERSION}",
        "sae_lens_id": sae_id,
        "sae_lens_release_id": release,
        "sae_lens_version": _installed("sae-lens"),
        "sae_cfg_dict": {
            "architecture": result.architecture,
            "d_in": result.d_in,
            "d_sae": result.d_sae,
            "k": result.k,
            "model_name": result.model,
            "hook_name": result.hook,
            "hook_layer": result.layer,
        },
        "eval_result_unstructured": {
            "sae_acceptance": {
                "version": PROJECT_VERSION,
                "metrics": {m: result.metrics[m].to_dict() for m in DIAGNOSTICS if m in result.metrics},
                "status": result.status.word,
            }
        },
    }


def _details(latents: Latents) -> list[dict[str, Any]]:
    """SAEBench's per-latent details, one entry per latent (a dead latent's consistency is NaN: -1)."""
    sequences = latents.fired_sequences if latents.fired_sequences is not None else np.zeros_like(latents.fired)
    with np.errstate(divide="ignore", invalid="ignore"):
        consistency = latents.fired / sequences
    columns = {"feature_density": latents.density, "consistent_activation_heuristic": consistency}
    columns |= {name: latents.weights[key] for name, key in DETAILS}
    rounded = {name: np.round(np.asarray(values, dtype=np.float64), DECIMALS) for name, values in columns.items()}
    return [
        {"index": i, **{name: _number(values[i]) for name, values in rounded.items()}}
        for i in range(len(latents.fired))
    ]


def write_saebench(folder: Path, report: EvalReport) -> list[Path]:
    """One SAEBench core file per evaluated SAE of `report` into `folder`."""
    written = []
    for result in report.saes.values():
        if result.error is None:
            path = Path(folder) / file_name(*identity(result))
            written.append(write_atomic(path, to_json(document(result, report))))
    return written


def _number(value: Any) -> float:
    """A finite float, or SAEBench's -1 for NaN and infinity (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else -1.0


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
