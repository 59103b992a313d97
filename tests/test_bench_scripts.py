"""benchmarks/gpu.sh, ready for a GPU: every command it runs works, here at a toy size on the CPU."""

from __future__ import annotations

import json
import math
import subprocess

from conftest import REPO

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
