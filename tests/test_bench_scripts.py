"""benchmarks/gpu.sh, ready for a GPU: every command it runs works, here at a toy size on the CPU; and
bench_release.py's `--diagnostics`, which times the diagnostics against the bare work their passes add."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
from conftest import REPO

TINY_RELEASE = [
    *("--device", "cpu", "--threads", "1", "--warmup", "0", "--inline"),
    *("--d-model", "32", "--n-layers", "3", "--n-heads", "4", "--vocab", "256", "--ctx", "16", "--d-sae", "128"),
    *("--n-batches", "2", "--batch-size", "2", "--k-grid", "2", "4"),
]

EXPECTED = [f"tiny-eval-{p}-{d}.json" for p in ("pythia-70m", "pythia-410m") for d in ("float32", "bfloat16")] + [
    "tiny-eval-pythia-70m-hf.json",
    "tiny-eval-pythia-70m-hf-full.json",
    "tiny-eval-kgrid-pythia-70m.json",
    "tiny-eval-kgrid-pythia-410m.json",
    "tiny-release-pythia-70m.json",
]


def test_gpu_script_runs_every_benchmark_at_a_tiny_size(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EXPECTED)
    for name in EXPECTED[:-1]:
        payload = json.loads((tmp_path / name).read_text())
        for per_count in payload["summary"].values():
            assert math.isfinite(per_count["ratios"]["project_over_limit"])
        for per in payload["raw"].values():
            for metrics in per["project"]["metrics"].values():
                assert math.isfinite(metrics["ce_rec"])
    assert json.loads((tmp_path / "tiny-eval-pythia-70m-hf-full.json").read_text())["config"]["backend"] == "hf-full"
    grid = json.loads((tmp_path / "tiny-eval-kgrid-pythia-70m.json").read_text())
    assert grid["config"]["k_grid"] == [2, 4, 8]
    release = json.loads((tmp_path / "tiny-release-pythia-70m.json").read_text())
    assert math.isfinite(release["ratios"]["project_over_limit"])
    assert len(release["raw"]["project"]["metrics"]) == len(release["config"]["hooks"]) * 2


def _release(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_release.py"), *TINY_RELEASE, *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_release_diagnostics_flag_times_on_off_and_the_extra_passes_limit(tmp_path):
    out = tmp_path / "release-diag.json"
    proc = _release("--repeats", "2", "--contenders", "project", "--diagnostics", "random,gradient", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert payload["config"]["diagnostics"] == ["random", "gradient"]
    raw = payload["raw"]
    assert set(raw) == {"project", "project-diag", "limit-diag"}
    assert all(len(r["seconds"]) == 2 for r in raw.values())
    # off: no diagnostic metric; on: the random and gradient parts' metrics, finite, and no other part's
    off, on = raw["project"]["metrics"], raw["project-diag"]["metrics"]
    assert set(off) == set(on) and len(on) == 3 * 2
    for name, metrics in on.items():
        assert "error_kl_ratio" not in off[name] and "grad_alignment" not in off[name]
        assert math.isfinite(metrics["error_kl_ratio"]) and math.isfinite(metrics["grad_alignment"])
        assert "explained_variance" not in metrics  # saebench is off
        assert metrics["ce_rec"] == pytest.approx(off[name]["ce_rec"], rel=1e-6)
    ratios = payload["ratios"]
    median = statistics.median
    extra = median(raw["project-diag"]["seconds"]) - median(raw["project"]["seconds"])
    assert ratios["diagnostics_extra_s"] == pytest.approx(extra)
    assert ratios["diagnostics_over_limit"] == pytest.approx(extra / median(raw["limit-diag"]["seconds"]))
    assert len(ratios["diagnostics_over_limit_each"]) == 2
    assert raw["limit-diag"]["seconds"][0] > 0
    assert "load average" in payload["uptime"]["start"] and "load average" in payload["uptime"]["end"]
    assert "diagnostics_over_limit" in proc.stdout


def test_release_diagnostics_flag_off_adds_nothing_and_a_bad_part_is_one_line(tmp_path):
    out = tmp_path / "release.json"
    proc = _release("--repeats", "1", "--contenders", "project", "--diagnostics", "off", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert set(payload["raw"]) == {"project"} and not any(k.startswith("diag") for k in payload["ratios"])
    bad = _release("--diagnostics", "random,bogus")
    assert bad.returncode == 2
    assert "--diagnostics: expected off, on or parts among random, gradient, worst, propagation, saebench" in bad.stderr
    assert "Traceback" not in bad.stderr
