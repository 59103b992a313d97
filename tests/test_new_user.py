"""What a new user meets first: help that shows defaults, no false hook warning, closing lines."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import warnings

import pytest
from conftest import identity_sae, random_topk_sae

import sae_acceptance.reference.build as build_module
from sae_acceptance.cli import EVAL_RUN, EVAL_SET, main
from sae_acceptance.config import EvalSettings, load_thresholds
from sae_acceptance.errors import HookOverrideWarning
from sae_acceptance.evaluate import evaluate
from sae_acceptance.gate import exit_status, verdict_line
from sae_acceptance.sources.sae_io import save_sae

OWN = "blocks.0.hook_resid_post"


def test_eval_help_shows_each_settings_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    shown = 0
    for name in EVAL_SET + EVAL_RUN:
        field = EvalSettings.model_fields[name]
        if field.is_required() or field.default is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(str(field.default))}\)", text), flag
        shown += 1
    assert shown >= 5


@pytest.fixture
def same_point_gate(tmp_path, tiny_checkpoint, tiny_tokens_file):
    """SAEs trained at blocks.0.hook_resid_post: one named at the same point the Hugging Face way,
    one moved to block 1, and a random one that fails."""
    save_sae(identity_sae(hook=OWN), tmp_path / "saes" / "same")
    save_sae(identity_sae(hook=OWN), tmp_path / "saes" / "moved")
    save_sae(random_topk_sae(k=2, hook=OWN, scale=3.0), tmp_path / "saes" / "bad")
    path = tmp_path / "thresholds.toml"
    path.write_text(
        f'[eval]\ndata = "{tiny_tokens_file}"\nmodel = "{tiny_checkpoint}"\nn_sequences = 8\ncontext_size = 16\n'
        "batch_size = 8\nbootstrap_resamples = 100\n\n[gate]\ncosine = { min = 0.9 }\n\n"
        '[[sae]]\npath = "saes/same"\nhook = "gpt_neox.layers.0"\n\n'
        '[[sae]]\npath = "saes/moved"\nhook = "gpt_neox.layers.1"\n\n'
        '[[sae]]\npath = "saes/bad"\n'
    )
    return path


def test_no_hook_override_warning_for_the_same_point_and_a_verdict_line(same_point_gate):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(load_thresholds(same_point_gate), progress=False)
    overrides = [str(w.message) for w in caught if issubclass(w.category, HookOverrideWarning)]
    assert len(overrides) == 1 and overrides[0].startswith("moved: evaluated at gpt_neox.layers.1"), overrides
    assert [r.name for r in report.entries if not r.passed] == ["bad"]
    assert exit_status(report) == 1
    assert verdict_line(report) == "verdict: FAILED (exit 1): 1 of 3 entries failed: bad"
    passing = dataclasses.replace(report, saes={k: v for k, v in report.saes.items() if k != "bad"})
    assert verdict_line(passing) == "verdict: PASSED (exit 0): 2 entries as expected"


def test_build_reference_says_each_stage_and_ends_with_a_closing_line(tmp_path, monkeypatch, capsys):
    """At a toy size (a few training steps and sequences): the stages and the closing line are the product's."""
    monkeypatch.setattr(
        build_module, "ReferenceModelSpec", functools.partial(build_module.ReferenceModelSpec, train_steps=2)
    )
    monkeypatch.setattr(build_module, "SAE_TRAIN_SEQUENCES", 64)
    monkeypatch.setattr(build_module, "EVAL_SEQUENCES", 8)
    out = tmp_path / "reference"
    start = time.perf_counter()
    assert main(["build-reference", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    stages = [line for line in lines if line.startswith("build-reference: ")]
    assert [s.split(":")[1].split()[0] for s in stages] == ["eval", "training", "injecting", "training", "training"]
    assert lines[-1].startswith(f"reference written to {out}: model (eval loss ")
    assert "SAEs L0-k4, L0-k32, L2-k4, L2-k32; refresh the baseline" in lines[-1]
    assert time.perf_counter() - start < 300
