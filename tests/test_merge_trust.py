"""A sharded gate decides exactly as a single run, regressions included, and `merge` joins only
the shards of one run: every mismatch is refused in one line naming the file (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shards import HOOKS, second_model, write_grid

from sae_acceptance.cli import main
from sae_acceptance.sources.sae_io import load_sae, save_sae

RUN = ("thresholds.toml", "-p", "no:cacheprovider", "--sae-no-progress")


@pytest.fixture
def regressed(tmp_path, tiny_checkpoint, tiny_tokens_file, monkeypatch) -> Path:
    """A gate that passes every bound, with a committed baseline, after which one SAE was retrained
    worse: its regression checks are the only failures. Two models, so two shards both evaluate."""
    monkeypatch.chdir(tmp_path)
    write_grid(
        tmp_path,
        tiny_checkpoint,
        tiny_tokens_file,
        per_hook=1,
        fail=None,
        h1_model=second_model(tmp_path, tiny_checkpoint),
    )
    toml = tmp_path / "thresholds.toml"
    toml.write_text('baseline = "thresholds.baseline.json"\n' + toml.read_text())
    assert main(["eval", "--config", str(toml), "--update-baseline", "--no-progress"]) == 0
    worse = load_sae(tmp_path / "saes" / "h0-k0")
    worse.W_dec = worse.W_dec + 0.5 * torch.randn(worse.W_dec.shape, generator=torch.Generator().manual_seed(7))
    save_sae(worse, tmp_path / "saes" / "h0-k0")
    return toml


def _shards(toml: Path, count: int, *extra: str, prefix: str = "s") -> list[str]:
    out = []
    for i in range(1, count + 1):
        path = toml.parent / f"{prefix}{i}.json"
        main(["eval", "--config", str(toml), "--shard", f"{i}/{count}", "--json", str(path), "--no-progress", *extra])
        out.append(str(path))
    return out


def test_a_release_that_only_regressed_fails_after_merge_as_in_a_single_run(regressed, pytester, capsys, monkeypatch):
    root = regressed.parent
    monkeypatch.chdir(root)  # the workspace the shards and merge run in (pytester moved it)
    single = main(["eval", "--config", str(regressed), "--json", str(root / "single.json"), "--no-progress"])
    printed = capsys.readouterr().out
    one = json.loads((root / "single.json").read_text())
    assert single == 1 and "REGRESSED" in printed
    assert one["saes"]["h0-k0"]["regressions"]["rel_error"]["status"] == "REGRESSED"
    assert all(v["passed"] for sae in one["saes"].values() for v in sae["verdicts"].values())  # bounds all pass

    summary = root / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    shards = _shards(regressed, 2)
    summary.write_text("")  # the merge job's page alone
    capsys.readouterr()
    merged = main(["merge", *shards, "--json", str(root / "merged.json"), "--html", str(root / "merged.html")])
    out = capsys.readouterr().out
    assert merged == single == 1
    both = json.loads((root / "merged.json").read_text())
    assert both["saes"] == one["saes"] and both["splices"] == one["splices"]
    # every summary marks the entry REGRESSED: the terminal table, the step summary, the annotations, the HTML
    row = next(line for line in out.splitlines() if line.startswith("h0-k0 "))
    assert row.rstrip().endswith("REGRESSED")
    assert "FAIL  h0-k0: regression: rel_error" in out
    page = summary.read_text()
    assert "## SAE acceptance: failed" in page and "REGRESSED" in page and "regression_rel_error" in page
    line = next(i for i, text in enumerate(regressed.read_text().splitlines(), 1) if 'name = "h0-k0"' in text) - 1
    assert (
        f"::error file=thresholds.toml,line={line},title=thresholds.toml%3A%3Ah0-k0%3A%3Aregression_rel_error::" in out
    )
    html = (root / "merged.html").read_text()
    assert '<td class="failed">REGRESSED</td>' in html and "regression rel_error: REGRESSED" in html
    assert (root / "merged.h0-k0.densities.npz").exists()  # the shards' densities carried over

    # pytest's shards merge to the same verdict
    for name in ("thresholds.toml", "thresholds.baseline.json", "thresholds.baseline.npz"):
        shutil.copy(root / name, pytester.path / name)
    shutil.copytree(root / "saes", pytester.path / "saes")  # model and tokens are named by absolute paths
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    monkeypatch.delenv("GITHUB_ACTIONS")
    monkeypatch.chdir(pytester.path)
    for i in (1, 2):
        result = pytester.runpytest(*RUN, "--sae-shard", f"{i}/2", "--sae-json", f"p{i}.json")
        assert result.ret in (0, 1)
    capsys.readouterr()
    assert main(["merge", *(str(pytester.path / f"p{i}.json") for i in (1, 2))]) == 1
    assert "REGRESSED" in capsys.readouterr().out


def test_merge_refuses_shards_that_do_not_belong_together(regressed, capsys):
    root = regressed.parent
    good = _shards(regressed, 2, "--run-id", "run-1", prefix="good")

    def refused(*paths: str, run: str | None = None) -> str:
        capsys.readouterr()
        assert main(["merge", *paths, *(["--run-id", run] if run else [])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        return err[0]

    def keep(path: str, name: str) -> str:
        return str(shutil.copy(path, root / name))

    # a stale file of an earlier run beside this run's shard
    stale = keep(_shards(regressed, 2, "--run-id", "run-0")[1], "stale-2.json")
    first = keep(_shards(regressed, 2, "--run-id", "run-1")[0], "run1-1.json")
    assert "stale-2.json: belongs to another run" in refused(first, stale)
    assert "belongs to another run" in refused(first, keep(good[1], "run1-2.json"), run="run-9")  # --run-id
    # the same shard twice
    assert "shard 1/2 again" in refused(first, keep(first, "copy-1.json"))
    # another thresholds file (a bound edited between the shards)
    edited = root / "edited.toml"
    edited.write_text(regressed.read_text().replace("max = 100.0", "max = 99.0"))
    main(
        [
            "eval",
            "--config",
            str(edited),
            "--shard",
            "2/2",
            "--json",
            str(root / "other-2.json"),
            "--no-progress",
            "--run-id",
            "run-1",
        ]
    )
    assert "other-2.json: ran another gate" in refused(first, str(root / "other-2.json"))
    # other token data under the same file name
    data = Path(next(line.split('"')[1] for line in regressed.read_text().splitlines() if line.startswith("data =")))
    copy = root / "tokens-copy.npy"
    shutil.copy(data, copy)
    regressed.write_text(regressed.read_text().replace(str(data), str(copy)))
    base = keep(_shards(regressed, 2, "--run-id", "run-2")[0], "data-1.json")
    np.save(copy, np.load(copy)[::-1].copy())  # same path, other tokens
    changed = keep(_shards(regressed, 2, "--run-id", "run-2")[1], "data-2.json")
    assert "data-2.json: evaluated other token data" in refused(base, changed)
    # a count edited to a billion: refused without sizing anything from it
    huge = json.loads(Path(first).read_text())
    huge["shard"]["count"] = 10**9
    (root / "huge.json").write_text(json.dumps(huge))
    assert "missing" in refused(str(root / "huge.json"))
    huge["shard"]["count"] = 1e9
    (root / "float.json").write_text(json.dumps(huge))
    assert "whole numbers" in refused(str(root / "float.json"))
    # the shards of one run merge
    capsys.readouterr()
    assert main(["merge", *good, "--run-id", "run-1"]) == 1
    assert HOOKS[0] in capsys.readouterr().out
