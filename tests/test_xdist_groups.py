"""pytest-xdist by hookpoint: each (model, hook) group is evaluated once, on one worker, with
all its SAEs (the hook read from each SAE's cfg.json), and the report equals `-n 0`'s."""

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


def _runs(pytester) -> list[dict[str, list[str]]]:
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
    runs = _runs(pytester)
    by_hook = {hook: saes for run in runs for hook, saes in run.items()}
    assert sorted(hook for run in runs for hook in run) == sorted(HOOKS)  # each hook in one model run
    assert by_hook == {hook: [f"h{h}-k{i}" for i in range(3)] for h, hook in enumerate(HOOKS)}
    workers: dict[str, set[str]] = {hook: set() for hook in HOOKS}
    for line in parallel.stdout.lines:  # "[gw0] PASSED thresholds.toml::h0-k1::rel_error"
        if line.startswith("[gw") and "thresholds.toml::" in line:
            name = line.split("thresholds.toml::")[1].split("::")[0]
            workers[HOOKS[int(name[1])]].add(line.split("]")[0])
    assert all(len(on) == 1 for on in workers.values()), workers

    serial = pytester.runpytest(*args, "-n", "0", "--sae-json", "n0.json")
    assert [sorted(run) for run in _runs(pytester)] == [sorted(HOOKS)]  # one pass for both hooks
    assert parallel.ret == serial.ret == 1
    assert parallel.parseoutcomes() == serial.parseoutcomes()
    n2, n0 = (json.loads((pytester.path / f).read_text()) for f in ("n2.json", "n0.json"))
    assert n2["saes"] == n0["saes"]
