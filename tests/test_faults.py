"""Faults: a writer killed (SIGKILL, SIGINT) at several moments while it rewrites a report, a
baseline or a sweep-cache SAE leaves the previous file whole, and no lock that blocks the next run.

The writer is a forked child looping over the real write path (`io.write_atomic`,
`baseline.update_baseline`, `save_sae` under the cache's lock); the parent kills it
at fixed delays, then reads the file back and takes the lock with a short timeout.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_topk_sae

from sae_acceptance.baseline import BaselineEntry, load_baseline, update_baseline
from sae_acceptance.io import locked, remove_lock, write_atomic
from sae_acceptance.sources.sae_io import load_sae, save_sae
from sae_acceptance.stats import SequenceSums

DELAYS_S = (0.0, 0.003, 0.02, 0.08)  # after the child's first complete write
N_SEQ = 20_000  # per-sequence sums big enough that a write takes a few milliseconds


def _report(path: Path, i: int) -> None:
    write_atomic(path, json.dumps({"version": i, "payload": "x" * 2_000_000}))


def _check_report(path: Path) -> None:
    report = json.loads(path.read_text())
    assert len(report["payload"]) == 2_000_000


def _entry(i: int) -> BaselineEntry:
    rng = np.random.default_rng(i)
    fingerprint = {
        "tokens": "t",
        "model": "m",
        "hook": "h",
        "dtype": "float32",
        "excluded_ids": [],
        "n_sequences": N_SEQ,
    }
    scalars = {"ce_orig": rng.random(N_SEQ), "n_tokens": np.full(N_SEQ, 64.0)}
    return BaselineEntry(fingerprint, {"ce_rec": 0.5 + i * 1e-3}, SequenceSums(scalars, rng.integers(0, 9, 256), 4))


def _baseline(path: Path, i: int) -> None:
    update_baseline(path, {"sae": _entry(i)})


def _check_baseline(path: Path) -> None:
    entry = load_baseline(path).entries["sae"]
    assert len(entry.sums.scalars["ce_orig"]) == N_SEQ


def _cache(path: Path, i: int) -> None:
    with locked(path.parent):
        save_sae(random_topk_sae(d=256, d_sae=4096, seed=i, hook="blocks.0.hook_resid_post"), path)


def _check_cache(path: Path) -> None:
    sae = load_sae(path)
    assert sae.d_in == 256 and sae.d_sae == 4096


WRITERS: dict[str, tuple[Callable[[Path, int], None], Callable[[Path], None], Callable[[Path], Path]]] = {
    "report": (_report, _check_report, lambda root: root / "report.json"),
    "baseline": (_baseline, _check_baseline, lambda root: root / "thresholds.baseline.json"),
    "sweep-cache": (_cache, _check_cache, lambda root: root / "cache" / "key" / "k4"),
}


def _run_writer(write: Callable[[Path, int], None], target: Path, ready: Path) -> None:
    """The forked child: write once, say so, then rewrite until killed."""
    torch.set_num_threads(1)  # the parent's intra-op thread pool did not survive the fork: using it hangs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = 0
    try:
        write(target, 0)
        ready.write_text("ready")
        i = 1
        while True:
            write(target, i)
            i += 1
    except KeyboardInterrupt:
        status = 130
    finally:
        os._exit(status)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
@pytest.mark.parametrize("what", list(WRITERS))
def test_a_killed_writer_leaves_the_previous_file_and_no_blocking_lock(tmp_path, what, sig):
    write, check, where = WRITERS[what]
    target = where(tmp_path)
    for n, delay in enumerate(DELAYS_S):
        ready = tmp_path / f"ready-{n}"
        pid = os.fork()
        if pid == 0:
            _run_writer(write, target, ready)
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ready.exists(), "the writer never finished its first write"
        time.sleep(delay)
        os.kill(pid, sig)
        _, status = os.waitpid(pid, 0)
        if sig != signal.SIGKILL:  # held until the write is whole, then delivered
            assert os.waitstatus_to_exitcode(status) == (130 if sig == signal.SIGINT else -signal.SIGTERM)
        check(target)  # the last complete version, whole
        if sig != signal.SIGKILL:  # an interrupted write leaves no temporary file, previous sidecar or lock
            left = [p.name for p in tmp_path.rglob("*") if p.suffix == ".tmp" or p.name.endswith(".prev.npz")]
            if what == "baseline":
                left += [p.name for p in tmp_path.rglob("*.lock")]
            assert not left
        start = time.monotonic()
        lock_of = target.parent if what == "sweep-cache" else target
        with locked(lock_of, timeout=5):
            pass
        remove_lock(lock_of)
        assert time.monotonic() - start < 1.0, "a stale lock held up the next run"


def test_a_baseline_interrupted_between_its_two_files_stays_readable(tmp_path, monkeypatch):
    import sae_acceptance.baseline as baseline

    path = tmp_path / "thresholds.baseline.json"
    update_baseline(path, {"sae": _entry(0)})
    real, calls = baseline.write_atomic, []

    def interrupted_second_write(target, data):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(target, data)

    monkeypatch.setattr(baseline, "write_atomic", interrupted_second_write)
    with pytest.raises(KeyboardInterrupt):
        update_baseline(path, {"sae": _entry(1)})
    monkeypatch.undo()
    _check_baseline(path)


def test_ctrl_c_just_after_the_temporary_file_is_made_waits_for_the_write(tmp_path, monkeypatch):
    """The window the forked test hits only by chance: SIGINT lands between mkstemp and the cleanup."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp_then_interrupt(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, before the caller can name the file for cleanup
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_interrupt)
    target = tmp_path / "report.json"
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "whole")
    assert target.read_text() == "whole"
    assert not list(tmp_path.glob("*.tmp"))
