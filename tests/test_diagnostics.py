"""Why an SAE fails: every diagnostic against a hand-written float64 forward and backward, the
random control's determinism, and SAEBench's core numbers against sae-bench's own functions."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import D_MODEL, identity_sae

from sae_acceptance.config import thresholds_from_mapping
from sae_acceptance.diagnostics import Diagnostics, random_generator, random_unit
from sae_acceptance.engine import run_model
from sae_acceptance.evaluate import evaluate
from sae_acceptance.metrics import DUPLICATE_COSINE
from sae_acceptance.saebench import write_saebench
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import save_sae
from sae_acceptance.sources.tokens import counted_mask

ALL = Diagnostics(random=True, gradient=True, worst_n=6, propagation=True, saebench=True, seed=3)
SPECIAL = [0, 1, 2]
BATCH = 8


def _standard(d_in: int, d_sae: int, seed: int, d_out: int | None = None, **fields) -> SAE:
    """A ReLU SAE with random unit decoder rows (continuous in its input: float32 and float64 agree)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_out or d_in, generator=g), dim=1)
    w_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    return SAE(w_enc, torch.full((d_sae,), -0.1), w_dec, torch.randn(d_out or d_in, generator=g) * 0.1,
               architecture="standard", apply_b_dec_to_input=False, **fields)  # fmt: skip


@dataclass(frozen=True)
class Case:
    hook: str  # where the SAE reads
    target: str  # where its output replaces the activation
    head: int | None
    sae: SAE


CASES = {
    "resid_post": Case("blocks.1.hook_resid_post", "blocks.1.hook_resid_post", None, _standard(D_MODEL, 64, 1)),
    "hook_z head 2": Case("blocks.1.attn.hook_z", "blocks.1.attn.hook_z", 2, _standard(8, 24, 2, hook_head_index=2)),
    "transcoder": Case(
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
        None,
        _standard(D_MODEL, 64, 3, hook_name_out="blocks.1.hook_mlp_out"),
    ),
}


def _flat(act: torch.Tensor) -> torch.Tensor:
    return act if act.ndim == 3 else act.flatten(2)


def _reference(model, tokens: torch.Tensor, counted: torch.Tensor, case: Case, name: str) -> dict:
    """The diagnostics written out by hand on a float64 copy of the model: plain forwards with hooks,
    autograd for the gradient, every sum over counted positions."""
    model = copy.deepcopy(model).to(torch.float64)
    sae = case.sae.to(dtype=torch.float64)
    generator = random_generator(ALL.seed, name)
    later = list(range(2, model.cfg.n_layers)) if case.target.endswith("resid_post") else [1, 2]
    blocks = [f"blocks.{layer}.hook_resid_post" for layer in later]
    totals: dict[str, float] = {}
    per_position, worst_where, moved, size = [], [], np.zeros(len(blocks)), np.zeros(len(blocks))

    def add(key: str, value: torch.Tensor) -> None:
        totals[key] = totals.get(key, 0.0) + float(value)

    def view(act: torch.Tensor) -> torch.Tensor:
        flat = _flat(act)
        return flat if case.head is None else flat[..., case.head * 8 : (case.head + 1) * 8]

    def replace(act: torch.Tensor, new_view: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        flat = _flat(act).clone()
        part = view(flat)
        part = torch.where(keep[..., None], new_view, part)
        if case.head is None:
            flat = part
        else:
            flat[..., case.head * 8 : (case.head + 1) * 8] = part
        return flat.reshape(act.shape)

    def losses(logits: torch.Tensor, log_p_orig: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = torch.log_softmax(logits, -1)
        ce = -log_p[:, :-1].gather(-1, tok[:, 1:, None]).squeeze(-1)
        kl = (log_p_orig.exp() * (log_p_orig - log_p)).sum(-1)
        return ce, kl

    for begin in range(0, tokens.shape[0], BATCH):
        tok, keep = tokens[begin : begin + BATCH], counted[begin : begin + BATCH]
        loss_keep = keep[:, :-1]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tok, names_filter=[case.hook, case.target, *blocks])
        log_p_orig = torch.log_softmax(logits, -1)
        ce_orig = -log_p_orig[:, :-1].gather(-1, tok[:, 1:, None]).squeeze(-1)
        a_in, a = view(cache[case.hook]), view(cache[case.target])
        recon, code = sae.reconstruct(a_in.reshape(-1, a_in.shape[-1]))
        recon, latents = recon.reshape(a.shape), code.dense(sae.d_sae).reshape(*a.shape[:2], -1)
        delta = recon - a

        def patched(new_view: torch.Tensor, observe: bool = False, tok=tok, keep=keep, cache=cache) -> torch.Tensor:
            hooks = [(case.target, lambda act, hook: replace(act, new_view, keep))]
            if observe:
                for i, block in enumerate(blocks):

                    def record(act, hook, i=i, block=block):
                        moved[i] += float(((act - cache[block]) ** 2).sum(-1)[keep].sum())
                        size[i] += float((cache[block] ** 2).sum(-1)[keep].sum())

                    hooks.append((block, record))
            with torch.no_grad():
                return model.run_with_hooks(tok, fwd_hooks=hooks)

        ce_recon, kl_recon = losses(patched(recon, observe=True), log_p_orig, tok)
        step = delta.norm(dim=-1, keepdim=True) * random_unit(a.shape, generator, torch.device("cpu")).double()
        ce_random, kl_random = losses(patched(a + step), log_p_orig, tok)
        leaf = _flat(cache[case.target]).clone().requires_grad_(True)
        logits_g = model.run_with_hooks(tok, fwd_hooks=[(case.target, lambda act, hook, x=leaf: x.reshape(act.shape))])
        ce_g = -torch.log_softmax(logits_g, -1)[:, :-1].gather(-1, tok[:, 1:, None]).squeeze(-1)
        (gradient,) = torch.autograd.grad(ce_g[loss_keep].sum(), leaf)
        g = view(gradient)
        along = (g * delta).sum(-1)
        mean = a[keep].mean(0)
        for key, value in {
            "n": keep.sum(),
            "n_loss": loss_keep.sum(),
            "ce_recon": ce_recon[loss_keep].sum(),
            "ce_orig": ce_orig[loss_keep].sum(),
            "kl_recon": kl_recon[keep].sum(),
            "ce_random": ce_random[loss_keep].sum(),
            "kl_random": kl_random[keep].sum(),
            "g_delta": along[keep].sum(),
            "ga_num": (along**2)[keep].sum(),
            "ga_den": ((g**2).sum(-1) * (delta**2).sum(-1))[keep].sum(),
            "recon_sq": (recon**2).sum(-1)[keep].sum(),
            "dot": (a * recon).sum(-1)[keep].sum(),
            "x_sq": (a**2).sum(-1)[keep].sum(),
            "sq_err": (delta**2).sum(-1)[keep].sum(),
            "l1": latents.sum(-1)[keep].sum(),
            "ev_legacy": (1 - (delta**2).sum(-1) / ((a - mean) ** 2).sum(-1))[keep].sum(),
        }.items():
            add(key, value)
        increase = (ce_recon - ce_orig).detach()
        for row, pos in zip(*torch.nonzero(loss_keep, as_tuple=True), strict=True):
            per_position.append(float(increase[row, pos]))
            worst_where.append((begin + int(row), int(pos)))
    d = case.sae.d_out
    mean_sq = totals["x_sq"] / totals["n"]
    order = np.lexsort((np.array(worst_where)[:, 1], np.array(worst_where)[:, 0], -np.array(per_position)))
    return {
        "metrics": {
            "ce_random": totals["ce_random"] / totals["n_loss"],
            "kl_random": totals["kl_random"] / totals["n"],
            "error_kl_ratio": totals["kl_recon"] / totals["kl_random"],
            "grad_alignment": d * totals["ga_num"] / totals["ga_den"],
            "delta_ce_linear": totals["g_delta"] / totals["n_loss"],
            "delta_ce": (totals["ce_recon"] - totals["ce_orig"]) / totals["n_loss"],
            "relative_reconstruction_bias": totals["recon_sq"] / totals["dot"],
            "l1": totals["l1"] / totals["n"],
            "explained_variance": 1 - (totals["sq_err"] / totals["n"]) / (mean_sq - (mean_sq / d) ** 2),
            "explained_variance_legacy": totals["ev_legacy"] / totals["n"],
        },
        "worst": [(worst_where[i], per_position[i]) for i in order[: ALL.worst_n]],
        "propagation": (later, list(moved / size)),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_every_diagnostic_equals_a_hand_written_float64_forward_and_backward(case, tiny_model, tiny_tokens):
    spec = CASES[case]
    counted = counted_mask(tiny_tokens, SPECIAL)
    run = run_model(tiny_model, {spec.hook: {"s": spec.sae}}, tiny_tokens, counted, BATCH, False, diagnostics=ALL)
    hook = run.hooks[spec.hook]
    got = hook.sums["s"].metrics()
    want = _reference(tiny_model, tiny_tokens, counted, spec, "s")
    for metric, value in want["metrics"].items():
        assert got[metric] == pytest.approx(value, rel=2e-4, abs=1e-6), metric
    assert want["metrics"]["delta_ce"] != pytest.approx(0.0, abs=1e-3)  # the SAE changes the loss: a real test
    worst = [((w["sequence"], w["position"]), w["increase"]) for w in hook.worst["s"]]
    assert [where for where, _ in worst] == [where for where, _ in want["worst"]]
    assert [v for _, v in worst] == pytest.approx([v for _, v in want["worst"]], rel=1e-4)
    for w in hook.worst["s"]:  # the window ends at the position; the target is the next token
        row = tiny_tokens[w["sequence"]]
        assert w["window"][-1] == int(row[w["position"]]) and w["target"] == int(row[w["position"] + 1])
        assert len(w["window"]) == min(24, w["position"] + 1)
    layers, ratios = want["propagation"]
    assert hook.propagation["s"].layers == layers
    assert hook.propagation["s"].ratios() == pytest.approx(ratios, rel=2e-4)


def test_an_error_that_is_itself_random_costs_what_a_random_error_costs(tiny_model, tiny_tokens):
    """An "SAE" whose error is a random linear map of the input: neither aligned with the loss
    gradient nor worse than noise of its size."""
    sae = identity_sae()
    noise = torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(5)) * 0.15 / D_MODEL**0.5
    sae.W_dec = torch.cat([torch.eye(D_MODEL) + noise, -(torch.eye(D_MODEL) + noise)], 0)
    counted = counted_mask(tiny_tokens, SPECIAL)
    hook = "blocks.1.hook_resid_post"
    run = run_model(tiny_model, {hook: {"noise": sae}}, tiny_tokens, counted, BATCH, False, diagnostics=ALL)
    got = run.hooks[hook].sums["noise"].metrics()
    assert 0.75 < got["error_kl_ratio"] < 1.33, got["error_kl_ratio"]
    assert 0.5 < got["grad_alignment"] < 2.0, got["grad_alignment"]


def test_the_random_control_is_the_same_whatever_else_is_evaluated(tiny_model, tiny_tokens):
    """Seeded by the eval seed and the SAE's name alone: a rerun, another SAE beside it, or another
    hook evaluated in the same run leave its numbers bit for bit."""
    counted = counted_mask(tiny_tokens, SPECIAL)
    sae = CASES["resid_post"].sae
    alone = run_model(tiny_model, {"blocks.1.hook_resid_post": {"s": sae}}, tiny_tokens, counted, BATCH, False,
                      diagnostics=ALL).hooks["blocks.1.hook_resid_post"].sums["s"]  # fmt: skip
    crowded = (
        run_model(
            tiny_model,
            {
                "blocks.0.hook_resid_post": {"a": _standard(D_MODEL, 32, 9)},
                "blocks.1.hook_resid_post": {"b": sae, "s": sae},
            },
            tiny_tokens,
            counted,
            BATCH,
            False,
            diagnostics=ALL,
        )
        .hooks["blocks.1.hook_resid_post"]
        .sums
    )
    for key in ("ce_random", "kl_random", "ga_num", "g_delta"):
        assert np.array_equal(alone.scalars[key], crowded["s"].scalars[key]), key
    assert not np.array_equal(crowded["b"].scalars["kl_random"], crowded["s"].scalars["kl_random"])  # another name
    assert random_generator(3, "s").initial_seed() == random_generator(3, "s").initial_seed()


@pytest.fixture(scope="module")
def standard_gate(tmp_path_factory, tiny_checkpoint, tiny_tokens_file):
    root = tmp_path_factory.mktemp("saebench")
    save_sae(_standard(D_MODEL, 64, 1, hook_name="blocks.1.hook_resid_post", model_name="tiny"), root / "sae")
    loaded = thresholds_from_mapping(
        {
            "eval": {
                "data": str(tiny_tokens_file),
                "model": str(tiny_checkpoint),
                "n_sequences": 8,
                "context_size": 16,
                "batch_size": 8,  # one batch: SAEBench's per-batch numbers are the pooled ones
                "bootstrap_resamples": 100,
            },
            "sae": [{"path": str(root / "sae"), "name": "sae"}],
        },
        source="test",
        base=root,
    )
    return root, evaluate(loaded, progress=False)


def test_saebench_core_numbers_equal_sae_bench_s_own_functions(standard_gate, tiny_model, tiny_tokens_file):
    core = pytest.importorskip("sae_bench.evals.core.main", reason="sae-bench 0.6.0 (.ci/run installs it)")
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens import SAE as SAELensSAE

    root, report = standard_gate
    ours = report.saes["sae"]
    sae = SAELensSAE.load_from_disk(str(root / "sae"))
    general_utils._standardize_sae_cfg(sae.cfg)
    tokens = torch.from_numpy(np.load(tiny_tokens_file)[:8, :16]).long()

    class OneBatch:  # the four members of an ActivationsStore sae-bench's core eval reads
        context_size, store_batch_size_prompts = tokens.shape[1], tokens.shape[0]

        def get_batch_tokens(self, n: int) -> torch.Tensor:
            return tokens

        def reset_input_dataset(self) -> None:
            pass

    with torch.no_grad():
        measured, per_latent = core.get_sparsity_and_variance_metrics(
            sae, tiny_model, OneBatch(), n_batches=1, compute_l2_norms=True, compute_sparsity_metrics=True,
            compute_variance_metrics=True, compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=tokens.shape[0], model_kwargs={}, ignore_tokens=set(SPECIAL),
        )  # fmt: skip
        weights = core.get_featurewise_weight_based_metrics(sae)
        misc = core.calculate_misc_metrics(per_latent | weights)
    pairs = {
        "relative_reconstruction_bias": measured["relative_reconstruction_bias"],
        "l1": measured["l1"],
        "explained_variance": measured["explained_variance"],
        "explained_variance_legacy": measured["explained_variance_legacy"],
        "l2_norm_in": measured["l2_norm_in"],
        "l2_norm_out": measured["l2_norm_out"],
        "freq_over_1_percent": misc["freq_over_1_percent"],
        "freq_over_10_percent": misc["freq_over_10_percent"],
        "normalized_freq_over_1_percent": misc["normalized_freq_over_1_percent"],
        "normalized_freq_over_10_percent": misc["normalized_freq_over_10_percent"],
        "max_decoder_cosine": misc["average_max_decoder_cosine_sim"],
        "max_encoder_cosine": misc["average_max_encoder_cosine_sim"],
        "alive_frac": misc["frac_alive"],
    }
    for metric, theirs in pairs.items():
        assert ours.metrics[metric].value == pytest.approx(theirs, rel=2e-5, abs=1e-6), metric
    assert ours.latents.density == pytest.approx(per_latent["feature_density"], abs=1e-6)
    for name in ("max_decoder_cosine", "max_encoder_cosine"):
        assert ours.latents.weights[name] == pytest.approx(weights[f"{name}_sim"], abs=1e-5)
    decoder = np.asarray(weights["max_decoder_cosine_sim"])
    assert ours.metrics["duplicate_frac"].value == pytest.approx(float((decoder > DUPLICATE_COSINE).mean()))


def test_saebench_files_validate_against_its_schema(standard_gate, tmp_path):
    core = pytest.importorskip("sae_bench.evals.core.main", reason="sae-bench 0.6.0 (.ci/run installs it)")
    jsonschema = pytest.importorskip("jsonschema")
    _, report = standard_gate
    (written,) = write_saebench(tmp_path / "core", report)
    assert written.name == "test_sae_eval_results.json" or written.name.endswith("_sae_eval_results.json")
    schema = json.loads((Path(core.__file__).parent / "eval_output_schema_core.json").read_text())
    document = json.loads(written.read_text())
    jsonschema.Draft202012Validator(schema).validate(document)
    assert len(document["eval_result_details"]) == 64
    metrics = document["eval_result_metrics"]
    assert metrics["sparsity"]["l1"] == pytest.approx(report.saes["sae"].metrics["l1"].value)
    assert "Infinity" not in written.read_text() and "NaN" not in written.read_text()
