"""GitHub Actions, simulated: the step summary and `::error` annotations from pytest and from
`eval --config`, at the failing entry's `[[sae]]` line; and progress under pytest without -s."""

from __future__ import annotations

import pytest
from conftest import identity_sae, random_topk_sae

from sae_acceptance.cli import main
from sae_acceptance.sources.sae_io import save_sae

HOOK = "blocks.1.hook_resid_post"
TEMPLATE = """\
[eval]
data = "{tokens}"
model = "{model}"
n_sequences = 16
context_size = 16
bootstrap_resamples = 200

[gate]
ce_rec = {{ min = 0.99 }}

[[sae]]
name = "good"
path = "saes/good"

[[sae]]
name = "bad"
path = "saes/bad"
"""
BAD_LINE = 15  # the second [[sae]]


@pytest.fixture
def thresholds(pytester, tiny_checkpoint, tiny_tokens_file, monkeypatch):
    save_sae(identity_sae(hook=HOOK), pytester.path / "saes" / "good")
    save_sae(random_topk_sae(k=2, hook=HOOK, scale=3.0), pytester.path / "saes" / "bad")
    path = pytester.path / "thresholds.toml"
    path.write_text(TEMPLATE.format(tokens=tiny_tokens_file, model=tiny_checkpoint))
    assert path.read_text().splitlines()[BAD_LINE - 1] == "[[sae]]"
    summary = pytester.path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    return summary


def _check_summary(text: str) -> None:
    assert text.startswith("earlier step\n")  # appended, not replaced
    assert "## SAE acceptance: failed" in text
    assert "| good | blocks.1.hook_resid_post |" in text and "| bad | blocks.1.hook_resid_post |" in text
    assert "### Failures (1)" in text
    assert f"`thresholds.toml::bad::ce_rec` (thresholds.toml:{BAD_LINE}): ce_rec " in text
    assert "< 0.99 (on point)" in text


def test_pytest_writes_the_step_summary_and_annotations(pytester, thresholds):
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    assert result.ret == 1
    errors = [line for line in result.stdout.lines if line.startswith("::error ")]
    assert len(errors) == 1
    assert errors[0].startswith(
        f"::error file=thresholds.toml,line={BAD_LINE},title=thresholds.toml%3A%3Abad%3A%3Ace_rec::ce_rec "
    )
    _check_summary(thresholds.read_text())


def test_eval_config_writes_the_same(pytester, thresholds, capsys, monkeypatch):
    monkeypatch.chdir(pytester.path)
    assert main(["eval", "--config", "thresholds.toml", "--no-progress"]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("::error ")]
    assert len(errors) == 1
    assert errors[0].startswith(
        f"::error file=thresholds.toml,line={BAD_LINE},title=thresholds.toml%3A%3Abad%3A%3Ace_rec::ce_rec "
    )
    _check_summary(thresholds.read_text())


def test_nothing_is_written_outside_github_actions(pytester, thresholds, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    monkeypatch.delenv("GITHUB_ACTIONS")
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    assert not any(line.startswith("::error") for line in result.stdout.lines)
    assert thresholds.read_text() == "earlier step\n"


def test_progress_shows_without_dash_s_and_hides_on_request(pytester, thresholds):
    shown = pytester.runpytest_subprocess("thresholds.toml", "-p", "no:cacheprovider")
    shown.stdout.fnmatch_lines(
        ["*sae-acceptance: evaluating 2 SAE(s) of thresholds.toml*", "*sae-acceptance: 2 SAE(s) evaluated in * s*"]
    )
    assert "eval blocks.1.hook_resid_post" in shown.stderr.str() + shown.stdout.str()  # the batch bar
    quiet = pytester.runpytest_subprocess("thresholds.toml", "-p", "no:cacheprovider", "--sae-no-progress")
    assert "sae-acceptance: evaluating" not in quiet.stdout.str()
    assert "eval blocks.1" not in quiet.stderr.str() + quiet.stdout.str()
