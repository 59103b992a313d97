"""CLI/pytest parity: one thresholds file gives the same baseline, regression verdicts, controls
and exit status under `sae-acceptance eval --config` and under `pytest`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from conftest import identity_sae, random_topk_sae

from sae_acceptance.baseline import load_baseline
from sae_acceptance.cli import CLI_FLAGS, main
from sae_acceptance.config import load_thresholds
from sae_acceptance.gate import exit_status, run_gate
from sae_acceptance.sources.sae_io import save_sae

HOOK = "blocks.1.hook_resid_post"
TEMPLATE = """\
baseline = "thresholds.baseline.json"

[eval]
data = "{tokens}"
model = "{model}"
n_sequences = 32
context_size = 16
batch_size = 16
bootstrap_resamples = 500

[gate]
ce_rec = {{ min = 0.5 }}
cosine = {{ min = 0.3 }}

[regression]
ce_rec = {{ tolerance = 0.01 }}

[[sae]]
name = "release"
path = "saes/release"

[[sae]]
name = "control"
path = "saes/control"
gate = {{ ce_rec = {{ min = 0.99 }} }}
expect_fail = ["ce_rec"]
"""


def pytest_outcomes(junit) -> dict[tuple[str, str], str]:
    """(sae, item) -> passed / failed / skipped / xfailed, from pytest's JUnit XML."""
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        sae = case.get("classname").rsplit(".", 1)[-1]
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        if kind == "skipped" and "xfail" in (case.find("skipped").get("type") or ""):
            kind = "xfailed"
        outcomes[(sae, case.get("name"))] = {"failure": "failed", "error": "failed"}.get(kind, kind)
    return outcomes


def library_outcomes(report) -> dict[tuple[str, str], str]:
    """The same table from `run_gate`: what the CLI decides its exit status on."""
    outcomes = {}
    for name, result in report.saes.items():
        for metric in result.verdicts:
            decided = result.outcome(metric)
            outcomes[(name, metric)] = (
                "xfailed" if decided.status.name == "CAUGHT" else "passed" if decided.as_expected else "failed"
            )
        outcomes[(name, "r2")] = "passed"
        for metric, check in result.regressions.items():
            outcomes[(name, f"regression_{metric}")] = (
                "skipped" if check.skipped else "passed" if check.passed else "failed"
            )
    return outcomes


def test_cli_and_pytest_run_the_same_gate_on_a_regression(pytester, tiny_checkpoint, tiny_tokens_file, capsys):
    root = pytester.path
    save_sae(identity_sae(hook=HOOK), root / "saes" / "release")
    save_sae(random_topk_sae(k=1, hook=HOOK, scale=3.0), root / "saes" / "control")
    toml = root / "thresholds.toml"
    toml.write_text(TEMPLATE.format(tokens=tiny_tokens_file, model=tiny_checkpoint))

    # The baseline, written by each: the same entries.
    assert main(["eval", "--config", str(toml), "--update-baseline", "--no-progress"]) == 0
    by_cli = load_baseline(root / "thresholds.baseline.json").entries
    (root / "thresholds.baseline.json").unlink()
    assert pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider", "--sae-update-baseline").ret == 0
    by_pytest = load_baseline(root / "thresholds.baseline.json").entries
    assert set(by_cli) == set(by_pytest) == {"release", "control"}
    for name in by_cli:
        assert by_cli[name].metrics == by_pytest[name].metrics
        assert by_cli[name].fingerprint == by_pytest[name].fingerprint

    # The release is retrained worse (fewer latents): its regression item fails under both.
    save_sae(random_topk_sae(k=8, hook=HOOK), root / "saes" / "release")
    capsys.readouterr()
    cli_status = main(["eval", "--config", str(toml), "--no-progress", "--json", str(root / "cli.json")])
    printed = capsys.readouterr().out
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider", "--junitxml=junit.xml")
    assert cli_status == result.ret == 1, printed + result.stdout.str()
    assert "REGRESSED" in printed and "FAIL  release: regression: ce_rec" in printed

    report = run_gate(
        load_thresholds(toml), load_baseline(root / "thresholds.baseline.json"), CLI_FLAGS, progress=False
    )
    expected = library_outcomes(report)
    assert expected[("release", "regression_ce_rec")] == "failed"
    assert expected[("control", "ce_rec")] == "xfailed"
    assert pytest_outcomes(root / "junit.xml") == expected
    assert exit_status(report) == 1

    # The same JSON report's verdicts under both.
    cli_report = json.loads((root / "cli.json").read_text())
    assert {n: s["verdicts"]["ce_rec"]["passed"] for n, s in cli_report["saes"].items()} == {
        "release": report.saes["release"].verdicts["ce_rec"].passed,
        "control": False,
    }


def test_a_baseline_measured_on_something_else_is_status_2_under_both(
    pytester, tiny_checkpoint, tiny_tokens_file, capsys
):
    root = pytester.path
    save_sae(identity_sae(hook=HOOK), root / "saes" / "release")
    save_sae(random_topk_sae(k=1, hook=HOOK, scale=3.0), root / "saes" / "control")
    toml = root / "thresholds.toml"
    toml.write_text(TEMPLATE.format(tokens=tiny_tokens_file, model=tiny_checkpoint))
    assert main(["eval", "--config", str(toml), "--update-baseline", "--no-progress"]) == 0
    toml.write_text(toml.read_text().replace("n_sequences = 32", "n_sequences = 32\nskip = 8"))
    capsys.readouterr()
    assert main(["eval", "--config", str(toml), "--no-progress"]) == 2
    assert "measured on something else" in capsys.readouterr().err
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*measured on something else*"])
