"""A release-sized thresholds file collects in time: each entry's line is found in one pass."""

from __future__ import annotations

import importlib.util
import re
import time

from conftest import REPO

from sae_acceptance.config import load_thresholds

ENTRIES = 10_000


def _load_benchmark():
    """benchmarks/bench_collection.py, whose release file the test collects (one writer for both)."""
    spec = importlib.util.spec_from_file_location("bench_collection", REPO / "benchmarks" / "bench_collection.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_release = _load_benchmark().write_release


def test_every_entry_points_at_its_own_line(tmp_path):
    loaded = load_thresholds(write_release(tmp_path, 50))
    lines = loaded.text.splitlines()
    for i in (0, 1, 49):
        at = loaded.line_of("sae", i)
        assert lines[at - 1] == "[[sae]]" and lines[at + 1] == f'name = "e{i}"'
        assert loaded.line_of("sae", i, "name") == at + 2
    assert loaded.line_of("gate", "ce_rec") == lines.index("ce_rec = { min = 0.5 }") + 1


def test_ten_thousand_entries_collect_in_a_bounded_time(pytester):
    write_release(pytester.path, ENTRIES)
    start = time.perf_counter()
    result = pytester.runpytest_subprocess(
        "--collect-only", "-q", "-p", "no:cacheprovider", "thresholds.toml", timeout=120
    )
    elapsed = time.perf_counter() - start
    assert result.ret == 0, result.stdout.str()[-2000:]
    # each entry: its ce_rec item and its reported r2
    assert re.search(rf"\b{2 * ENTRIES} tests collected", result.stdout.str())
    assert f"thresholds.toml::e{ENTRIES - 1}::ce_rec" in result.stdout.str()
    assert elapsed < 60, f"collection took {elapsed:.1f} s"
