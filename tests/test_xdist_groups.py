"""pytest-xdist by hookpoint: each (model, hook) group is evaluated once, on one worker, with
all its SAEs (the hook read from each SAE's cfg.json); a model's groups are spread over workers
only where that repeats little work; the report equals `-n 0`'s."""

from __future__ import annotations

import json

from test_shards import HOOKS, write_grid

import sae_acceptance.evaluate as evaluate

COUNTING = """
import json
from pathlib import Path

import sae_acceptance.evaluate as evaluate

_real = getattr(evaluate.run_model, "__wrapped__", evaluate.run_model)  # once, in pytester's own process too


def _counting(backend, by_hook, *args, **kwargs):
    with open(Path(__file__).parent / "runs.log", "a") as log:
        log.write(json.dumps({hook: sorted(saes) for hook, saes in by_hook.items()}) + "\\n")
    return _real(backend, by_hook, *args, **kwargs)


_counting.__wrapped__ = _real
evaluate.run_model = _counting
"""


def model_runs(pytester) -> list[dict[str, list[str]]]:
    """The model runs since the last call: {hook: SAE names} each."""
    log = pytester.path / "runs.log"
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return runs


def test_each_group_once_on_one_worker_and_the_same_report(pytester, tiny_checkpoint, tiny_tokens_file, monkeypatch):
    monkeypatch.setattr(evaluate, "run_model", evaluate.run_model)  # undone after the test: the conftest wraps it
    write_grid(pytester.path, tiny_checkpoint, tiny_tokens_file)
    pytester.makeconftest(COUNTING)
    args = ("thresholds.toml", "-p", "no:cacheprovider", "--sae-no-progress", "-v")
    parallel = pytester.runpytest(*args, "-n", "2", "--sae-json", "n2.json")
    # two thin groups of one model: spreading them would repeat the original pass (+20%), so one
    # worker evaluates both in one model run, as -n 0 does
    assert model_runs(pytester) == [{hook: [f"h{h}-k{i}" for i in range(3)] for h, hook in enumerate(HOOKS)}]
    workers = {
        line.split("]")[0] for line in parallel.stdout.lines if line.startswith("[gw") and "thresholds.toml::" in line
    }
    assert len(workers) == 1, workers

    serial = pytester.runpytest(*args, "-n", "0", "--sae-json", "n0.json")
    assert [sorted(run) for run in model_runs(pytester)] == [sorted(HOOKS)]  # one pass for both hooks
    assert parallel.ret == serial.ret == 1
    assert parallel.parseoutcomes() == serial.parseoutcomes()
    n2, n0 = (json.loads((pytester.path / f).read_text()) for f in ("n2.json", "n0.json"))
    assert n2["saes"] == n0["saes"]


def test_a_splice_and_its_members_run_once_on_one_worker(pytester, tiny_checkpoint, tiny_tokens_file, monkeypatch):
    from test_shards import write_spliced_grid

    monkeypatch.setattr(evaluate, "run_model", evaluate.run_model)
    other = pytester.path / "model-b"  # a second model (the same weights): no original pass repeated
    other.symlink_to(tiny_checkpoint, target_is_directory=True)
    write_spliced_grid(pytester.path, tiny_checkpoint, tiny_tokens_file, h2_model=other)
    pytester.makeconftest(COUNTING)
    args = ("thresholds.toml", "-p", "no:cacheprovider", "--sae-no-progress", "-v")
    parallel = pytester.runpytest(*args, "-n", "2", "--sae-json", "n2.json")
    runs = model_runs(pytester)
    # two units, one model run each: the splice's members' hooks together, and the other model's hook
    assert sorted(sorted(run) for run in runs) == [[*HOOKS], ["blocks.2.hook_resid_post"]]
    workers: dict[str, set[str]] = {}
    for line in parallel.stdout.lines:
        if line.startswith("[gw") and "thresholds.toml::" in line:
            entry = line.split("thresholds.toml::")[1].split("::")[0]
            unit = "h2" if entry.startswith("h2") else "pair"  # h0, h1 and splice:pair are one unit
            workers.setdefault(unit, set()).add(line.split("]")[0])
    assert set(workers) == {"pair", "h2"} and all(len(on) == 1 for on in workers.values()), workers
    assert workers["pair"] != workers["h2"]  # spread: the two models' runs share no pass

    serial = pytester.runpytest(*args, "-n", "0", "--sae-json", "n0.json")
    assert len(model_runs(pytester)) == 2  # one per model
    assert parallel.ret == serial.ret == 0
    assert parallel.parseoutcomes() == serial.parseoutcomes()
    n2, n0 = (json.loads((pytester.path / f).read_text()) for f in ("n2.json", "n0.json"))
    assert n2["saes"] == n0["saes"] and n2["splices"] == n0["splices"] and list(n0["splices"]) == ["pair"]
