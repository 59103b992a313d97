"""The CLI: same loaders and engine as the plugin, a table on stdout, JSON on request."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, identity_sae, random_topk_sae

from sae_acceptance.cli import main
from sae_acceptance.sources.sae_io import save_sae

HOOK = "blocks.1.hook_resid_post"


def test_eval_on_a_local_checkpoint_saelens_sae_and_npy_tokens(tmp_path, tiny_checkpoint, tiny_tokens_file, capsys):
    save_sae(identity_sae(hook=HOOK), tmp_path / "ident")
    save_sae(random_topk_sae(k=4, hook=HOOK), tmp_path / "topk")
    out = tmp_path / "report.json"
    status = main(
        [
            "eval",
            "--model",
            str(tiny_checkpoint),
            "--sae",
            str(tmp_path / "ident"),
            "--sae",
            str(tmp_path / "topk"),
            "--data",
            str(tiny_tokens_file),
            "--n-sequences",
            "32",
            "--context-size",
            "16",
            "--bootstrap-resamples",
            "500",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "ident" in printed and "topk" in printed and "tokens counted" in printed
    report = json.loads(out.read_text())
    assert report["eval"]["n_sequences"] == 32 and report["eval"]["bootstrap"]["resamples"] == 500
    assert report["timing"]["eval_s"] > 0
    ident = report["saes"]["ident"]
    assert ident["metrics"]["ce_rec"]["value"] == 1.0 and ident["hook"] == HOOK
    assert report["saes"]["topk"]["metrics"]["l0"]["value"] <= 4
    assert ident["geometry"]["d_model"] == 32


def test_eval_of_the_embedded_default_config(capsys):
    status = main(["eval", "--config", str(REPO / "thresholds.toml"), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed  # every negative control caught, every other SAE passing
    assert "XFAIL L2-k4: negative control caught: ce_rec" in printed
    assert "WARN  L2-k4: r2 = " in printed and "WARN  L0-k32" not in printed


def test_bad_input_is_one_line_and_status_2(tmp_path, tiny_checkpoint, tiny_tokens_file, capsys):
    status = main(
        ["eval", "--model", str(tiny_checkpoint), "--sae", str(tmp_path / "nothing"), "--data", str(tiny_tokens_file)]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "sae.0.path: no such SAE directory" in err


def test_pr_profile_writes_json_and_plot(tmp_path, tiny_checkpoint, tiny_tokens_file, capsys):
    status = main(
        [
            "pr-profile",
            "--model",
            str(tiny_checkpoint),
            "--data",
            str(tiny_tokens_file),
            "--n-sequences",
            "32",
            "--context-size",
            "16",
            "--json",
            str(tmp_path / "pr.json"),
            "--plot",
            str(tmp_path / "pr.png"),
            "--no-progress",
        ]
    )
    assert status == 0
    profile = json.loads((tmp_path / "pr.json").read_text())
    assert [layer["layer"] for layer in profile["layers"]] == [0, 1, 2]
    assert set(profile["layers"][0]) == {"layer", "hook", "pr", "pr_deflated", "pr_ratio", "canyon"}
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pr_deflated" in capsys.readouterr().out


def test_pr_profile_finds_the_reference_canyon(tmp_path):
    """The reference model's canyon starts at block 1: raw PR collapses, deflated PR does not."""
    main(
        [
            "pr-profile",
            "--model",
            str(REPO / "reference" / "model"),
            "--data",
            str(REPO / "reference" / "tokens.npy"),
            "--n-sequences",
            "64",
            "--context-size",
            "64",
            "--json",
            str(tmp_path / "pr.json"),
            "--no-progress",
        ]
    )
    layers = json.loads((tmp_path / "pr.json").read_text())["layers"]
    assert [layer["canyon"] for layer in layers] == [False, True, True, True]
    assert all(layer["pr_deflated"] > 5 * layer["pr"] for layer in layers[1:])


@pytest.mark.parametrize("argv", [["eval"], ["pr-profile", "--model", "x"]])
def test_missing_arguments_are_explained(argv, capsys):
    assert main(argv) == 2
    assert "needs" in capsys.readouterr().err


def test_eval_with_a_config_refuses_flags_it_would_ignore(capsys):
    status = main(["eval", "--config", str(REPO / "thresholds.toml"), "--device", "cpu", "--n-sequences", "4"])
    assert status == 2
    error = capsys.readouterr().err
    assert "eval --config takes the eval settings, models and SAEs from" in error
    assert "drop --n-sequences, --device" in error


def test_eval_flags_default_to_the_thresholds_file_defaults():
    from sae_acceptance.cli import build_parser
    from sae_acceptance.config import EvalSettings

    pr = build_parser().parse_args(["pr-profile", "--model", "m", "--data", "d.npy"])
    for name in ("n_sequences", "context_size", "skip", "batch_size", "device", "dtype"):
        assert getattr(pr, name) == EvalSettings.model_fields[name].default, name
