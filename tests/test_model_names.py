"""A model name that can only be a local path never reaches a hub; a hub name that fails is one line, once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

import sae_acceptance.sources.model as model_module
from sae_acceptance.cli import main
from sae_acceptance.config import load_thresholds, names_local_path
from sae_acceptance.errors import ConfigError, SourceError
from sae_acceptance.sources.model import load_backend

SAE = REPO / "reference" / "saes" / "L0-k32"
TOKENS = REPO / "reference" / "tokens.npy"


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("reference/modle", True),  # `reference/` exists in the base folder
        ("EleutherAI/pythia-70m", False),
        ("gpt2", False),
        ("./model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("owner/repo/sub", True),
        ("owner\\repo", True),
        ("owner/", True),
    ],
)
def test_which_names_are_paths(name, local):
    assert names_local_path(name, REPO) is local


@pytest.fixture
def no_model_loads(monkeypatch):
    """A model load (where a hub would be asked) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model_module, "load_backend", refuse)


def test_a_mistyped_model_path_is_one_line_at_once(monkeypatch, capsys, no_model_loads):
    monkeypatch.chdir(REPO)
    start = time.perf_counter()
    status = main(["eval", "--model", "reference/modle", "--sae", str(SAE), "--data", str(TOKENS), "--no-progress"])
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert status == 2
    assert err.strip().splitlines() == [
        "sae-acceptance: error: command line: eval.model: no such model directory 'reference/modle'"
    ]
    assert elapsed < 5


def test_a_mistyped_model_path_in_a_thresholds_file_names_its_line(tmp_path):
    (tmp_path / "models").mkdir()
    path = tmp_path / "thresholds.toml"
    path.write_text(
        f'[eval]\nmodel = "models/pythia"\ndata = "{TOKENS}"\n\n[gate]\ncosine = {{ min = 0.5 }}\n\n'
        f'[[sae]]\npath = "{SAE}"\nmodel = "./nowhere"\n'
    )
    with pytest.raises(ConfigError, match=r"thresholds.toml:2: eval.model: no such model directory 'models/pythia'$"):
        load_thresholds(path)
    path.write_text(path.read_text().replace('"models/pythia"', '"gpt2"'))
    with pytest.raises(ConfigError, match=r"thresholds.toml:10: sae.0.model: no such model directory './nowhere'$"):
        load_thresholds(path)


def test_the_library_refuses_a_path_like_name_without_a_hub(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SourceError, match=r"^model 'reference/modle': no such directory$"):
        load_backend("reference/modle", device="cpu")


def test_hub_retry_lines_do_not_reach_the_user():
    """In a fresh process, where huggingface_hub is first imported inside the call (as the CLI
    imports it when a model loads), and after it: a retry line is held back, the level restored."""
    script = (
        "import logging\n"
        "from sae_acceptance.sources.hub_calls import quiet_hub\n"
        "with quiet_hub():\n"
        "    from huggingface_hub.utils import _http\n"
        "    _http.logger.warning('Retrying in 1s [Retry 1/5].')\n"
        "with quiet_hub():\n"
        "    _http.logger.warning('Retrying in 2s [Retry 2/5].')\n"
        "_http.logger.warning('outside the call')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Retry" not in proc.stderr and "outside the call" in proc.stderr


def _env() -> dict[str, str]:
    """This checkout first on the path; no hub reachable."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_an_unknown_hub_name_offline_is_said_once_with_what_it_waited_for(tmp_path):
    """Output and errors on one pipe, as in a terminal: the error shows once, no retry lines."""
    env = _env()
    name = "nosuchowner/nosuchmodel"
    args = ["eval", "--model", name, "--sae", str(SAE), "--data", str(TOKENS), "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "sae_acceptance.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    output = proc.stdout
    assert proc.returncode == 2, output
    assert output.count(f"model {name!r}: no such local directory") == 1, output
    waited = output.index(f"looking for model {name!r} in the Hugging Face cache (HF_HUB_OFFLINE is set)...")
    assert waited < output.index("no such local directory")
    assert "Retry" not in output and "Traceback" not in output
    assert not list(Path(tmp_path).iterdir())
