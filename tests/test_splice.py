"""Splices: the joint patched loss against a hand-written forward with several hooks replaced at once;
one member equals that SAE's own numbers; two members at one hook is a config error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_topk_sae

from sae_acceptance.config import load_thresholds, thresholds_from_mapping
from sae_acceptance.errors import ConfigError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.sources.sae_io import save_sae
from sae_acceptance.sources.tokens import counted_mask

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def spliced(tmp_path_factory, tiny_checkpoint, tiny_tokens_file):
    root = tmp_path_factory.mktemp("splice")
    saes = {f"s{i}": random_topk_sae(k=4, seed=i, hook=hook) for i, hook in enumerate(HOOKS)}
    for name, sae in saes.items():
        save_sae(sae, root / name)
    loaded = thresholds_from_mapping(
        {
            "eval": {
                "data": str(tiny_tokens_file),
                "model": str(tiny_checkpoint),
                "n_sequences": 16,
                "context_size": 16,
                "batch_size": 8,
                "bootstrap_resamples": 200,
            },
            "sae": [{"path": str(root / name)} for name in saes],
            "splice": [
                {"name": "both", "saes": ["s0", "s1"], "gate": {"ce_rec": {"min": 0.99}, "kl_div": {"max": 100.0}}},
                {"name": "alone", "saes": ["s1"]},
            ],
        },
        source="test",
        base=root,
    )
    return evaluate(loaded, progress=False), saes


def _hand_forward(model, tokens, counted, replace):
    """Pooled CE and KL(p_orig || p) with `replace(hook, act)` applied at every hook at once."""

    def hook_fn(act, hook):
        return torch.where(counted[..., None], replace(hook.name, act), act)

    with torch.no_grad():
        orig = model(tokens).double().log_softmax(-1)
        patched = model.run_with_hooks(tokens, fwd_hooks=[(h, hook_fn) for h in HOOKS]).double().log_softmax(-1)
    loss_mask = counted[:, :-1]
    targets = tokens[:, 1:, None]
    ce_orig = -orig[:, :-1].gather(-1, targets).squeeze(-1)[loss_mask].mean()
    ce = -patched[:, :-1].gather(-1, targets).squeeze(-1)[loss_mask].mean()
    kl = (orig.exp() * (orig - patched)).sum(-1)[counted].mean()
    return float(ce_orig), float(ce), float(kl)


def test_joint_loss_matches_a_hand_written_forward(spliced, tiny_model, tiny_tokens_file):
    report, saes = spliced
    splice = report.splices["both"]
    assert splice.error is None and splice.hooks == list(HOOKS)
    tokens = torch.from_numpy(np.load(tiny_tokens_file)[:16]).long()
    counted = counted_mask(tokens, report.saes["s0"].excluded_ids)
    by_hook = {sae.hook_name: sae for sae in saes.values()}

    def reconstruct(hook, act):
        recon, _ = by_hook[hook].reconstruct(act.reshape(-1, act.shape[-1]))
        return recon.reshape(act.shape)

    ce_orig, ce_recon, kl = _hand_forward(tiny_model, tokens, counted, reconstruct)
    _, ce_ablate, _ = _hand_forward(tiny_model, tokens, counted, lambda hook, act: torch.zeros_like(act))
    m = {name: v.value for name, v in splice.metrics.items()}
    assert m["ce_orig"] == pytest.approx(ce_orig, rel=1e-5)
    assert m["ce_recon"] == pytest.approx(ce_recon, rel=1e-5)
    assert m["ce_ablate"] == pytest.approx(ce_ablate, rel=1e-5)
    assert m["kl_div"] == pytest.approx(kl, rel=1e-4)
    assert m["ce_rec"] == pytest.approx(2 - ce_recon / ce_orig, rel=1e-5)
    assert m["ce_loss_score"] == pytest.approx((ce_ablate - ce_recon) / (ce_ablate - ce_orig), rel=1e-4)
    # not either member's own loss, and the interval is a sequence bootstrap around the point
    assert all(abs(m["ce_recon"] - report.saes[n].metrics["ce_recon"].value) > 1e-3 for n in saes)
    low, high = splice.metrics["ce_rec"].ci
    assert low < m["ce_rec"] < high
    assert set(splice.verdicts) == {"ce_rec", "kl_div"} and splice.verdicts["kl_div"].passed
    assert report.to_dict()["splices"]["both"]["saes"] == ["s0", "s1"]


def test_one_member_splice_equals_the_sae_exactly(spliced):
    report, _ = spliced
    alone, sae = report.splices["alone"], report.saes["s1"]
    for name, value in alone.metrics.items():
        assert value == sae.metrics[name], name  # point and interval, bit for bit


def test_two_members_at_one_hook_is_a_config_error_with_its_line(tmp_path, tiny_checkpoint, tiny_tokens_file):
    for name in ("a", "b"):
        save_sae(random_topk_sae(hook=HOOKS[0]), tmp_path / name)
    text = f"""[eval]
data = "{tiny_tokens_file}"
model = "{tiny_checkpoint}"
n_sequences = 8
context_size = 16

[[sae]]
path = "a"
hook = "{HOOKS[0]}"

[[sae]]
path = "b"
hook = "{HOOKS[0]}"

[[splice]]
name = "twice"
saes = ["a", "b"]
"""
    path = tmp_path / "thresholds.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"thresholds.toml:17: splice.0.saes: a and b are both at blocks.0"):
        load_thresholds(path)
    path.write_text(
        text.replace(f'hook = "{HOOKS[0]}"\n', "")
    )  # hooks in cfg.json only: found at eval time (2 lines up)
    report = evaluate(load_thresholds(path), progress=False)
    assert report.splices["twice"].error.endswith(
        "thresholds.toml:15: splice.0.saes: a and b are both at blocks.0.hook_resid_post: a splice patches each hook once"
    )
    assert report.saes["a"].error is None
    path.write_text(text.replace('saes = ["a", "b"]', 'saes = ["a", "c"]'))
    with pytest.raises(ConfigError, match=r"thresholds.toml:17: splice.0.saes: no \[\[sae\]\] named 'c'"):
        load_thresholds(path)
    path.write_text(text.replace('saes = ["a", "b"]', 'saes = ["a"]\ngate = { cosine = { min = 0.5 } }'))
    with pytest.raises(
        ConfigError, match=r"thresholds.toml:18: splice.0.gate.cosine: a splice or CLT gates its joint loss only"
    ):
        load_thresholds(path)


def test_baseline_entries_hold_every_splice_under_its_key(spliced):
    """The CLI and the plugin both write `baseline_entries(report)`: splices are in it, so
    `eval --config --update-baseline` gives splice regression items something to compare with."""
    from sae_acceptance.baseline import baseline_entries
    from sae_acceptance.config import EvalSettings

    report, _ = spliced
    entries = baseline_entries(report, EvalSettings(**{k: v for k, v in report.settings.items() if k in EVAL_KEYS}))
    assert set(entries) == {"s0", "s1", "splice:both", "splice:alone"}
    joint = entries["splice:both"]
    assert joint.fingerprint["hook"] == " + ".join(HOOKS)
    assert joint.metrics["ce_rec"] == report.splices["both"].metrics["ce_rec"].value


EVAL_KEYS = ("data", "model", "n_sequences", "context_size", "batch_size", "bootstrap_resamples")
