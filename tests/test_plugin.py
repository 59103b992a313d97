"""The pytest plugin, driven by pytester: items, selection, failures, reports, bad input."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from conftest import identity_sae, random_topk_sae

from sae_acceptance.sources.sae_io import save_sae

HOOK = "blocks.1.hook_resid_post"
TEMPLATE = """\
[eval]
data = "{tokens}"
model = "{model}"
n_sequences = 16
context_size = 16
batch_size = 8
bootstrap_resamples = 200

[gate]
ce_rec = {{ min = 0.99 }}
cosine = {{ min = 0.5 }}
alive_frac = {{ min = 0.01 }}
{extra}
[[sae]]
name = "good"
path = "saes/good"

[[sae]]
name = "bad"
path = "saes/bad"
{extra_sae}"""


@pytest.fixture
def gate(pytester, tiny_checkpoint, tiny_tokens_file):
    """Write SAEs and a thresholds.toml into the pytester directory; returns a writer."""
    save_sae(identity_sae(hook=HOOK), pytester.path / "saes" / "good")
    save_sae(random_topk_sae(k=2, hook=HOOK, scale=3.0), pytester.path / "saes" / "bad")

    def write(extra: str = "", extra_sae: str = "", **replace: str):
        text = TEMPLATE.format(tokens=tiny_tokens_file, model=tiny_checkpoint, extra=extra, extra_sae=extra_sae)
        for old, new in replace.items():
            text = text.replace(old.replace("__", " "), new)
        pytester.path.joinpath("thresholds.toml").write_text(text)
        return pytester.path / "thresholds.toml"

    return write


def test_one_item_per_sae_and_metric_with_the_right_failures(pytester, gate):
    gate()
    result = pytester.runpytest("thresholds.toml", "-v", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*thresholds.toml::good::ce_rec PASSED*",
            "*thresholds.toml::good::cosine PASSED*",
            "*thresholds.toml::good::alive_frac PASSED*",
            "*thresholds.toml::good::r2 PASSED*",
            "*thresholds.toml::bad::ce_rec FAILED*",
        ]
    )
    result.stdout.fnmatch_lines(["*ce_rec * [[]*, *[]] < 0.99 (on point)*; loss * -> * nats (+*%)*"])
    result.stdout.fnmatch_lines(["*SAE acceptance*", "*sae*hook*ce_rec*", "*good*PASS*", "*bad*FAIL*"])
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 5 and outcomes["failed"] >= 1
    assert result.ret == 1


def test_selection_by_keyword_and_node_id(pytester, gate):
    gate()
    result = pytester.runpytest("thresholds.toml", "-k", "good and ce_rec", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=7)
    result = pytester.runpytest("thresholds.toml::bad::cosine", "-v", "-p", "no:cacheprovider")
    assert result.parseoutcomes().get("passed", 0) + result.parseoutcomes().get("failed", 0) == 1
    result.stdout.fnmatch_lines(["*thresholds.toml::bad::cosine*"])


def test_junit_properties_and_json_report(pytester, gate):
    gate()
    pytester.runpytest(
        "thresholds.toml", "--junitxml=junit.xml", "--sae-json=out/report.json", "-p", "no:cacheprovider"
    )
    tree = ET.parse(pytester.path / "junit.xml")
    case = next(c for c in tree.iter("testcase") if c.get("name") == "ce_rec" and "good" in c.get("classname"))
    assert case.get("classname") == "thresholds.toml.good"
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert float(properties["ce_rec"]) == pytest.approx(1.0)
    assert {"ce_rec_ci_low", "ce_rec_ci_high", "passed"} <= set(properties)
    report = json.loads((pytester.path / "out" / "report.json").read_text())
    assert {"eval", "timing", "saes"} <= set(report)
    assert report["eval"]["tokens"]["n_counted"] < report["eval"]["tokens"]["n_tokens"]
    assert report["timing"]["tokens_per_s"] > 0
    good = report["saes"]["good"]
    assert good["hook"] == HOOK and good["model"].endswith("model")
    assert good["metrics"]["ce_rec"]["value"] == pytest.approx(1.0) and len(good["metrics"]["ce_rec"]["ci"]) == 2
    assert good["verdicts"]["ce_rec"] == {
        **good["verdicts"]["ce_rec"],
        "passed": True,
        "bound": {"min": 0.99, "on": "point"},
    }
    assert report["saes"]["bad"]["verdicts"]["ce_rec"]["passed"] is False


def test_malformed_thresholds_is_a_collection_error_with_file_and_line(pytester, gate):
    gate(**{"n_sequences = 16": "n_sequences = -3"})
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*thresholds.toml:4: eval.n_sequences: Input should be greater than 0*"])


def test_missing_sae_path_is_a_collection_error(pytester, gate):
    gate(**{'path = "saes/bad"': 'path = "saes/nothing"'})
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*thresholds.toml:20: sae.1.path: no such SAE directory 'saes/nothing'*"])


def test_negative_control_is_xfail_when_caught_and_fails_when_it_passes(pytester, gate):
    gate(extra_sae='expect_fail = ["ce_rec"]\n')
    result = pytester.runpytest("thresholds.toml", "-rx", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*bad::ce_rec*negative control caught: ce_rec*"])
    gate(**{'name = "good"\npath = "saes/good"': 'name = "good"\npath = "saes/good"\nexpect_fail = ["ce_rec"]'})
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*negative control passed, the gate no longer catches it*"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {'path = "saes/good"': 'path = "saes/good"\nhook = "blocks.1.hook_resid_pots"'},
            "*hook 'blocks.1.hook_resid_pots' does not exist in the model; closest valid hooks: blocks.1.hook_resid_post*",
        ),
        ({"n_sequences = 16": "n_sequences = 1000"}, "*has 64 sequences, fewer than skip + n_sequences = 0 + 1000*"),
        ({"context_size = 16": "context_size = 64"}, "*eval.context_size = 64 is beyond the model's n_ctx = 32*"),
    ],
)
def test_bad_inputs_fail_the_items_with_one_clear_message(pytester, gate, edit, message):
    gate(**edit)
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([message])
    assert result.ret == 2  # bad input, not a failed gate: the CLI's status too


def test_width_mismatch_and_nan_weights(pytester, gate):
    gate()
    save_sae(identity_sae(d=16, hook=HOOK), pytester.path / "saes" / "good")
    broken = random_topk_sae(hook=HOOK)
    broken.W_dec[3, 5] = float("nan")
    save_sae(broken, pytester.path / "saes" / "bad")
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*SAE d_in = 16 but hook blocks.1.hook_resid_post has width 32*"])
    result.stdout.fnmatch_lines(["*SAE weights hold NaN or infinity in tensor(s) W_dec*"])
    result.assert_outcomes(failed=8)


def test_r2_warning_only_where_the_canyon_flags_the_layer(pytester, gate):
    gate(extra="[canyon]\nthreshold = 0.99\n")  # every layer of a 32-wide model is "in the canyon"
    result = pytester.runpytest(
        "thresholds.toml", "-p", "no:cacheprovider", "-W", "default::sae_acceptance.R2ProxyWarning"
    )
    result.stdout.fnmatch_lines(["*R2ProxyWarning: good: r2 = * a layer the PR canyon flags*judge by ce_rec*"])
    assert result.stdout.str().count("R2ProxyWarning: ") == 2  # one per SAE
    escalated = pytester.runpytest(
        "thresholds.toml", "-p", "no:cacheprovider", "-W", "error::sae_acceptance.R2ProxyWarning"
    )
    escalated.stdout.fnmatch_lines(["*FAILED thresholds.toml::good::r2*", "*FAILED thresholds.toml::bad::r2*"])
    gate(extra="[canyon]\nthreshold = 0.0001\n")
    quiet = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    assert "R2ProxyWarning" not in quiet.stdout.str()


def test_sae_eval_fixture_for_hand_written_tests(pytester, gate):
    gate()
    pytester.makepyfile(
        test_hand="""
        def test_good_is_lossless(sae_eval):
            result = sae_eval("good")
            assert result.metrics["ce_rec"].value == 1.0
            assert result.metrics["kl_div"].value < 1e-6
        """
    )
    pytester.runpytest("test_hand.py", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_xdist_workers_share_the_load(pytester, gate):
    gate()
    result = pytester.runpytest("thresholds.toml", "-n", "2", "--dist", "loadscope", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, failed=1)
    result.stdout.fnmatch_lines(["*SAE acceptance*", "*good*PASS*"])


def test_default_xdist_mode_evaluates_each_sae_once(pytester, gate):
    """`-n 2` alone (`--dist load`): an SAE's items stay on one worker, so it is evaluated once
    and has one row in the summary; the regression table comes back from the workers too."""
    gate()
    pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider", "--sae-update-baseline")
    result = pytester.runpytest(
        "thresholds.toml", "-n", "2", "-v", "-p", "no:cacheprovider", "--sae-baseline", "thresholds.baseline.json"
    )
    result.assert_outcomes(passed=7 + 6, failed=1)
    lines = result.stdout.lines
    workers: dict[str, set[str]] = {"good": set(), "bad": set()}
    for line in lines:  # "[gw0] PASSED thresholds.toml::good::ce_rec"
        if line.startswith("[gw") and "thresholds.toml::" in line:
            workers[line.split("thresholds.toml::")[1].split("::")[0]].add(line.split("]")[0])
    assert all(len(on) == 1 for on in workers.values()), workers
    gate_rows = [line for line in lines if line.startswith(("good ", "bad "))]
    assert sorted(row.split()[0] for row in gate_rows if "blocks.1" in row) == ["bad", "good"]
    regression_rows = [row for row in gate_rows if "blocks.1" not in row]
    assert len(regression_rows) == 6 and all(row.rstrip().endswith("ok") for row in regression_rows)


def test_a_hook_outside_the_blocks_fails_only_its_own_sae(pytester, gate):
    gate(extra_sae='hook = "ln_final.hook_normalized"\n')
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*hook 'ln_final.hook_normalized' is outside the blocks*"])
    result.assert_outcomes(passed=4, failed=4)  # good's four items pass; bad's four fail with that error


def test_sae_eval_with_an_unknown_name_lists_the_names(pytester, gate):
    gate()
    pytester.makepyfile(test_hand="def test_typo(sae_eval):\n    sae_eval('godo')\n")
    result = pytester.runpytest("test_hand.py", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*no [[][[]sae[]][]] named 'godo' (there are: good, bad)*"])
