"""The bad-input matrix: every user mistake ends as one line naming what is at fault.

Each case builds a small workspace (a tiny checkpoint, tokens, one good SAE, a
thresholds file), applies one mistake, runs the CLI in-process (or pytest through
pytester) and checks: the exit status (2 for bad input, under pytest too), one
line on stderr under 300 characters with no traceback, the thing at fault named,
and no temporary or lock file left behind (nor a target half-written).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import identity_sae, random_topk_sae

from sae_acceptance.cli import main
from sae_acceptance.sources.sae_io import save_sae

HOOK = "blocks.1.hook_resid_post"
TEMPLATE = """\
[eval]
data = "tokens.npy"
model = "{model}"
n_sequences = 8
context_size = 16
batch_size = 8
bootstrap_resamples = 100

[gate]
ce_rec = {{ min = 0.5 }}
cosine = {{ min = 0.5 }}

[[sae]]
name = "good"
path = "good"
"""


@dataclass
class Workspace:
    root: Path
    model: Path

    @property
    def toml(self) -> Path:
        return self.root / "thresholds.toml"

    def edit(self, old: str, new: str) -> Path:
        text = self.toml.read_text()
        assert old in text, old
        self.toml.write_text(text.replace(old, new))
        return self.toml

    def append(self, text: str) -> Path:
        self.toml.write_text(self.toml.read_text() + text)
        return self.toml

    def sae(self, name: str, sae=None) -> Path:
        return save_sae(sae if sae is not None else identity_sae(hook=HOOK), self.root / name)

    def config_argv(self, *extra: str) -> list[str]:
        return ["eval", "--config", str(self.toml), "--no-progress", *extra]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_checkpoint, tiny_tokens_file) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    shutil.copy(tiny_tokens_file, root / "tokens.npy")
    save_sae(identity_sae(hook=HOOK), root / "good")
    (root / "thresholds.toml").write_text(TEMPLATE.format(model=tiny_checkpoint))
    return root


@pytest.fixture
def ws(tmp_path, pristine, tiny_checkpoint) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(pristine, root)
    return Workspace(root, tiny_checkpoint)


def no_leftovers(*roots: Path) -> None:
    """No temporary file of an atomic write, no lock file and no kept previous version anywhere
    under `roots`, and no marker file a hostile payload writes when it runs."""
    for root in roots:
        if root.is_dir():
            left = [
                p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".lock", ".prev.npz")) or p.name == MARKER
            ]
            assert not left, left


# A file that code shipped in a hostile input writes when it runs: never there after a run.
MARKER = "RAN-FOREIGN-CODE"
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def one_line(err: str, *named: str) -> str:
    line = err.strip()
    assert line, "nothing on stderr"
    assert "\n" not in line, err
    assert "Traceback" not in err and len(line) < 300, err
    for part in named:
        assert part in line, (part, line)
    return line


# Each case: (id, the mistake: ws -> argv, exit status, what the line must name).
Case = tuple[str, Callable[[Workspace], list[str]], int, tuple[str, ...]]


def _sae_with_d_in_16(ws: Workspace) -> list[str]:
    ws.sae("good", identity_sae(d=16, hook=HOOK))
    return ws.config_argv()


def _nan_sae(ws: Workspace) -> list[str]:
    broken = random_topk_sae(hook=HOOK)
    broken.W_dec[3, 5] = float("nan")
    ws.sae("good", broken)
    return ws.config_argv()


def _cfg_d_in(ws: Workspace) -> list[str]:
    cfg = json.loads((ws.root / "good" / "cfg.json").read_text())
    cfg["d_in"] = 128
    (ws.root / "good" / "cfg.json").write_text(json.dumps(cfg))
    return ws.config_argv()


def _garbage(path: Path, data: bytes = b"this is not what it should be") -> Path:
    path.write_bytes(data)
    return path


def _tokens(ws: Workspace, array: np.ndarray) -> list[str]:
    np.save(ws.root / "tokens.npy", array)
    return ws.config_argv()


def _baseline(ws: Workspace, text: str) -> list[str]:
    (ws.root / "base.json").write_text(text)
    ws.toml.write_text('baseline = "base.json"\n' + ws.toml.read_text())
    return ws.config_argv()


def _fifo_baseline(ws: Workspace) -> list[str]:
    ws.toml.write_text('baseline = "base.json"\n' + ws.toml.read_text())
    _fifo(ws.root / "base.json")
    return ws.config_argv()


def _other_tokens_baseline(ws: Workspace) -> list[str]:
    """A baseline written on other tokens: compared, it is refused with what differs."""
    ws.toml.write_text('baseline = "base.json"\n' + ws.toml.read_text())
    assert main(ws.config_argv("--update-baseline")) == 0
    ws.edit("n_sequences = 8", "n_sequences = 8\nskip = 8")
    return ws.config_argv()


def _train(ws: Workspace, *flags: str) -> list[str]:
    base = {
        "--model": str(ws.model),
        "--hook": HOOK,
        "--data": str(ws.root / "tokens.npy"),
        "--k": "4",
        "--train-tokens": "256",
        "--context-size": "16",
        "--out": str(ws.root / "trained"),
    }
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    return ["train", *[x for flag, value in {**base, **given}.items() for x in (flag, value)], "--no-progress"]


def _checkpoint(ws: Workspace) -> Path:
    """A copy of the tiny checkpoint inside the workspace, named by the thresholds file."""
    copy = ws.root / "model"
    shutil.copytree(ws.model, copy)
    ws.edit(f'model = "{ws.model}"', 'model = "./model"')
    return copy


def _remote_code(ws: Workspace, model_type: str = "evil") -> list[str]:
    """A checkpoint whose config.json maps its classes to a module it ships, which writes the marker."""
    copy = _checkpoint(ws)
    config = json.loads((copy / "config.json").read_text())
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config.update(model_type=model_type, auto_map=auto_map)
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "evil.py").write_text(PAYLOAD.format(marker=str(ws.root / MARKER)))
    return ws.config_argv()


def _remote_tokenizer(ws: Workspace) -> list[str]:
    copy = _checkpoint(ws)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    (copy / "evil.py").write_text(PAYLOAD.format(marker=str(ws.root / MARKER)))
    return ws.config_argv()


def _fifo(path: Path) -> Path:
    """`path` replaced by a named pipe nothing writes to: a reader that opens it waits forever."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def _endless(path: Path) -> Path:
    """`path` replaced by a symlink to /dev/zero: a reader that reads it to the end never stops."""
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")
    return path


class _Payload:
    """Unpickled, it runs `PAYLOAD`: what a code-running pickle in a weights file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (PAYLOAD.format(marker=str(self.marker)),))


def _pickle_checkpoint(ws: Workspace) -> list[str]:
    """The checkpoint's weights as a pytorch_model.bin holding a code-running pickle."""
    import torch

    copy = _checkpoint(ws)
    (copy / "model.safetensors").unlink()
    torch.save({"gpt_neox.embed_in.weight": _Payload(ws.root / MARKER)}, copy / "pytorch_model.bin")
    return ws.config_argv()


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _cfg(ws: Workspace, **fields) -> list[str]:
    cfg_file = ws.root / "good" / "cfg.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **fields}))
    return ws.config_argv()


def _deep(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def _dictionary_learning(ws: Workspace, layer: object) -> list[str]:
    """A dictionary_learning AutoEncoder folder whose config records `layer`."""
    import torch

    folder = ws.root / "dl"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    d, f = 32, 64
    tensors = {
        "encoder.weight": torch.randn(f, d, generator=g),
        "encoder.bias": torch.zeros(f),
        "decoder.weight": torch.randn(d, f, generator=g),
        "bias": torch.zeros(d),
    }
    torch.save(tensors, folder / "ae.pt")
    trainer = {"dict_class": "AutoEncoder", "activation_dim": d, "dict_size": f, "layer": layer}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    ws.edit('path = "good"', f'path = "good"\n\n[[sae]]\nname = "dl"\npath = "dl"\nhook = "{HOOK}"')
    return ws.config_argv()


def _shard_report(ws: Workspace, edit: Callable[[dict], object] | None = None) -> Path:
    """The one shard report of a 1-shard run (and its densities), `edit`ed as a newer version or a
    hostile hand would."""
    path = ws.root / "shards" / "s1.json"
    assert main(ws.config_argv("--shard", "1/1", "--json", str(path))) == 0
    if edit is not None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return path


def _claims_gigabytes(path: Path) -> Path:
    """Rewrite an .npz's central directory so one member claims ~4 GB unpacked: what a
    decompression bomb's header says, in a few bytes."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    data[at + 24 : at + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def _written_baseline(ws: Workspace) -> Path:
    ws.toml.write_text('baseline = "base.json"\n' + ws.toml.read_text())
    assert main(ws.config_argv("--update-baseline")) == 0
    return ws.root / "base.json"


def _baseline_d_in(ws: Workspace) -> list[str]:
    path = _written_baseline(ws)
    data = json.loads(path.read_text())
    data["saes"]["good"]["sums"]["d_in"] = "wide"
    path.write_text(json.dumps(data))
    return ws.config_argv()


def _above_cap(path: Path) -> Path:
    """`path` grown (sparse, nothing written) past the size any configuration file may have."""
    from sae_acceptance.io import CONFIG_LIMIT

    os.truncate(path, CONFIG_LIMIT + 1)
    return path


CASES: list[Case] = [
    # thresholds.toml
    (
        "toml-missing",
        lambda ws: ["eval", "--config", str(ws.root / "nothing.toml")],
        2,
        ("nothing.toml", "no such file"),
    ),
    ("toml-fifo", lambda ws: (_fifo(ws.toml), ws.config_argv())[1], 2, ("thresholds.toml", "not a regular file")),
    ("toml-dev-zero", lambda ws: (_endless(ws.toml), ws.config_argv())[1], 2, ("thresholds.toml", "not a regular")),
    (
        "toml-above-cap",
        lambda ws: (_above_cap(ws.toml), ws.config_argv())[1],
        2,
        ("thresholds.toml", "67,108,865 bytes", "refused unread"),
    ),
    (
        "toml-not-utf8",
        lambda ws: (_garbage(ws.toml, b"\xff\xfe" + ws.toml.read_bytes()), ws.config_argv())[1],
        2,
        ("thresholds.toml", "not UTF-8"),
    ),
    (
        "toml-deep-array",
        lambda ws: (ws.append(f"deep = {_deep()}\n"), ws.config_argv())[1],
        2,
        ("thresholds.toml", "nested too deeply"),
    ),
    ("toml-syntax", lambda ws: (ws.append("[gate\n"), ws.config_argv())[1], 2, ("thresholds.toml", "not valid TOML")),
    (
        "toml-negative",
        lambda ws: (ws.edit("n_sequences = 8", "n_sequences = -3"), ws.config_argv())[1],
        2,
        ("thresholds.toml:4", "eval.n_sequences"),
    ),
    (
        "toml-unknown-key",
        lambda ws: (ws.edit("batch_size = 8", "batch_sise = 8"), ws.config_argv())[1],
        2,
        ("thresholds.toml:", "eval.batch_sise"),
    ),
    (
        "toml-r2-gated",
        lambda ws: (ws.edit("cosine = {", "r2 = { min = 0.9 }\ncosine = {"), ws.config_argv())[1],
        2,
        ("gate.r2", "never"),
    ),
    (
        "toml-unknown-metric",
        lambda ws: (ws.edit("cosine = {", "cosnie = {"), ws.config_argv())[1],
        2,
        ("gate.cosnie", "unknown metric"),
    ),
    (
        "toml-min-above-max",
        lambda ws: (ws.edit("{ min = 0.5 }\n\n", "{ min = 0.5, max = 0.1 }\n\n"), ws.config_argv())[1],
        2,
        ("gate.cosine", "above max"),
    ),
    (
        "toml-duplicate-name",
        lambda ws: (ws.append('\n[[sae]]\nname = "good"\npath = "good"\n'), ws.config_argv())[1],
        2,
        ("two [[sae]] entries",),
    ),
    (
        "toml-control-unbounded",
        lambda ws: (ws.append('expect_fail = ["kl_div"]\n'), ws.config_argv())[1],
        2,
        ("expect_fail", "kl_div"),
    ),
    (
        "toml-sae-missing",
        lambda ws: (ws.edit('path = "good"', 'path = "gone"'), ws.config_argv())[1],
        2,
        ("sae.0.path", "'gone'"),
    ),
    (
        "toml-no-sae",
        lambda ws: (ws.edit('[[sae]]\nname = "good"\npath = "good"\n', ""), ws.config_argv())[1],
        2,
        ("sae",),
    ),
    (
        "toml-data-missing",
        lambda ws: (ws.edit('data = "tokens.npy"', 'data = "tokns.npy"'), ws.config_argv())[1],
        2,
        ("eval.data", "tokns.npy"),
    ),
    (
        "toml-device",
        lambda ws: (ws.edit("batch_size = 8", 'batch_size = 8\ndevice = "gpu"'), ws.config_argv())[1],
        2,
        ("eval.device",),
    ),
    (
        "toml-hub-name",
        lambda ws: (ws.edit('path = "good"', 'path = "hf://only-owner"'), ws.config_argv())[1],
        2,
        ("sae.0.path",),
    ),
    (
        "toml-bootstrap-beyond-memory",
        lambda ws: (ws.edit("bootstrap_resamples = 100", "bootstrap_resamples = 1e12"), ws.config_argv())[1],
        2,
        ("thresholds.toml", "[eval] bootstrap_resamples = 1,000,000,000,000", "memory"),
    ),
    (
        "toml-hub-revision-escapes",
        lambda ws: (ws.edit('path = "good"', 'path = "hf://owner/repo@..%2F..%2F..%2Fevilref/sae"'), ws.config_argv())[
            1
        ],
        2,
        ("sae.0.path", "revision", "'..'", "percent-decoded"),
    ),
    (
        "toml-sae-name-too-long",
        lambda ws: (ws.edit('name = "good"', f'name = "{"n" * 230}"'), ws.config_argv())[1],
        2,
        ("thresholds.toml:14", "sae.0.name", "230 bytes"),
    ),
    (
        "toml-sae-name-nul",
        lambda ws: (ws.edit('name = "good"', 'name = "go\\u0000od"'), ws.config_argv())[1],
        2,
        ("thresholds.toml:14", "sae.0.name", "control character"),
    ),
    (
        "toml-sae-dir-name-too-long",
        lambda ws: (
            (ws.root / "good").rename(ws.root / ("d" * 230)),
            ws.edit('name = "good"\npath = "good"', f'path = "{"d" * 230}"'),
            ws.config_argv(),
        )[2],
        2,
        ("thresholds.toml:14", "sae.0.path", "230 bytes"),
    ),
    (
        "toml-regression-direction",
        lambda ws: (ws.edit("[[sae]]", "[regression]\nl0 = { tolerance = 1 }\n\n[[sae]]"), ws.config_argv())[1],
        2,
        ("regression", "l0"),
    ),
    # SAE directories
    (
        "sae-no-weights",
        lambda ws: ((ws.root / "good" / "sae_weights.safetensors").unlink(), ws.config_argv())[1],
        2,
        ("good", "no SAE weights"),
    ),
    (
        "sae-cfg-not-json",
        lambda ws: (_garbage(ws.root / "good" / "cfg.json"), ws.config_argv())[1],
        2,
        ("cfg.json", "not valid JSON"),
    ),
    (
        "sae-weights-garbage",
        lambda ws: (_garbage(ws.root / "good" / "sae_weights.safetensors"), ws.config_argv())[1],
        2,
        ("sae_weights.safetensors",),
    ),
    (
        "sae-cfg-fifo",
        lambda ws: (_fifo(ws.root / "good" / "cfg.json"), ws.config_argv())[1],
        2,
        ("good/cfg.json", "not a regular file"),
    ),
    (
        "sae-cfg-dev-zero",
        lambda ws: (_endless(ws.root / "good" / "cfg.json"), ws.config_argv())[1],
        2,
        ("good/cfg.json", "not a regular file"),
    ),
    (
        "sae-weights-fifo",
        lambda ws: (_fifo(ws.root / "good" / "sae_weights.safetensors"), ws.config_argv())[1],
        2,
        ("good/sae_weights.safetensors", "not a regular file"),
    ),
    (
        "sae-weights-dev-zero",
        lambda ws: (_endless(ws.root / "good" / "sae_weights.safetensors"), ws.config_argv())[1],
        2,
        ("good/sae_weights.safetensors", "not a regular file"),
    ),
    (
        "sae-cfg-above-cap",
        lambda ws: (_above_cap(ws.root / "good" / "cfg.json"), ws.config_argv())[1],
        2,
        ("good/cfg.json", "refused unread"),
    ),
    (
        "model-config-above-cap",
        lambda ws: (_above_cap(_checkpoint(ws) / "config.json"), ws.config_argv())[1],
        2,
        ("model/config.json", "refused unread"),
    ),
    (
        "sae-cfg-deep",
        lambda ws: (_garbage(ws.root / "good" / "cfg.json", _deep().encode()), ws.config_argv())[1],
        2,
        ("good/cfg.json", "nested too deeply"),
    ),
    ("sae-cfg-dtype-int8", lambda ws: _cfg(ws, dtype="int8"), 2, ("good/cfg.json", "dtype", "int8")),
    ("sae-cfg-head-negative", lambda ws: _cfg(ws, hook_head_index=-1), 2, ("good/cfg.json", "hook_head_index")),
    ("dl-layer-not-a-number", lambda ws: _dictionary_learning(ws, "three"), 2, ("dl/config.json", "layer", "three")),
    ("sae-nan", _nan_sae, 2, ("good", "NaN", "W_dec")),
    ("sae-width", _sae_with_d_in_16, 2, ("d_in = 16", "width 32")),
    ("sae-cfg-d_in", _cfg_d_in, 2, ("cfg.json", "d_in")),
    (
        "sae-hook-typo",
        lambda ws: (ws.append('hook = "blocks.1.hook_resid_pots"\n'), ws.config_argv())[1],
        2,
        ("blocks.1.hook_resid_pots", "blocks.1.hook_resid_post"),
    ),
    (
        "sae-hook-outside",
        lambda ws: (ws.append('hook = "ln_final.hook_normalized"\n'), ws.config_argv())[1],
        2,
        ("ln_final.hook_normalized", "outside the blocks"),
    ),
    (
        "sae-path-is-file",
        lambda ws: (shutil.rmtree(ws.root / "good"), _garbage(ws.root / "good"), ws.config_argv())[2],
        2,
        ("good", "directory"),
    ),
    (
        "sae-cli-missing",
        lambda ws: [
            "eval",
            "--model",
            str(ws.model),
            "--sae",
            str(ws.root / "nothing"),
            "--data",
            str(ws.root / "tokens.npy"),
        ],
        2,
        ("sae.0.path", "nothing"),
    ),
    # models
    (
        "model-missing-dir",
        lambda ws: (ws.edit(f'model = "{ws.model}"', 'model = "./no-model"'), ws.config_argv())[1],
        2,
        ("no-model",),
    ),
    (
        "model-not-a-checkpoint",
        lambda ws: (
            (ws.root / "empty").mkdir(),
            ws.edit(f'model = "{ws.model}"', 'model = "./empty"'),
            ws.config_argv(),
        )[2],
        2,
        ("empty",),
    ),
    (
        "model-config-fifo",
        lambda ws: (_fifo(_checkpoint(ws) / "config.json"), ws.config_argv())[1],
        2,
        ("model/config.json", "not a regular file"),
    ),
    (
        "model-weights-dev-zero",
        lambda ws: (_endless(_checkpoint(ws) / "model.safetensors"), ws.config_argv())[1],
        2,
        ("model/model.safetensors", "not a regular file"),
    ),
    (
        "model-tokenizer-fifo",
        lambda ws: (_fifo(_checkpoint(ws) / "tokenizer.json"), ws.config_argv())[1],
        2,
        ("model/tokenizer.json", "not a regular file"),
    ),
    ("model-pickle-bin", _pickle_checkpoint, 2, ("model/pytorch_model.bin",)),
    (
        "model-safetensors-truncated",
        lambda ws: (_truncated(_checkpoint(ws) / "model.safetensors"), ws.config_argv())[1],
        2,
        ("model/model.safetensors",),
    ),
    ("model-auto-map", _remote_code, 2, ("config.json", "auto_map", "never runs")),
    ("model-tokenizer-auto-map", _remote_tokenizer, 2, ("tokenizer_config.json", "auto_map", "never runs")),
    (
        "model-context-beyond-n_ctx",
        lambda ws: (ws.edit("context_size = 16", "context_size = 64"), ws.config_argv())[1],
        2,
        ("context_size = 64", "n_ctx = 32"),
    ),
    # token files
    ("tokens-garbage", lambda ws: (_garbage(ws.root / "tokens.npy"), ws.config_argv())[1], 2, ("tokens.npy", ".npy")),
    (
        "tokens-fifo",
        lambda ws: (_fifo(ws.root / "tokens.npy"), ws.config_argv())[1],
        2,
        ("tokens.npy", "not a regular"),
    ),
    ("tokens-float", lambda ws: _tokens(ws, np.zeros((64, 16))), 2, ("tokens.npy", "float64")),
    (
        "tokens-too-few",
        lambda ws: (ws.edit("n_sequences = 8", "n_sequences = 1000"), ws.config_argv())[1],
        2,
        ("tokens.npy", "fewer than"),
    ),
    (
        "tokens-beyond-vocab",
        lambda ws: _tokens(ws, np.full((64, 16), 5000, dtype=np.int64)),
        2,
        ("token ids", "vocabulary of 64"),
    ),
    (
        "tokens-all-excluded",
        lambda ws: (
            ws.edit("batch_size = 8", "batch_size = 8\nexclude_special_tokens = " + str(list(range(64)))),
            ws.config_argv(),
        )[1],
        2,
        ("exclude_special_tokens", "every token"),
    ),
    (
        "tokens-exclude-beyond-int64",
        lambda ws: (
            ws.edit("batch_size = 8", "batch_size = 8\nexclude_special_tokens = [1, 99999999999999999999]"),
            ws.config_argv(),
        )[1],
        2,
        ("exclude_special_tokens", "99999999999999999999"),
    ),
    (
        "tokens-directory",
        lambda ws: ((ws.root / "dir.npy").mkdir(), ws.edit('"tokens.npy"', '"dir.npy"'), ws.config_argv())[2],
        2,
        ("dir.npy", "directory"),
    ),
    # baselines
    (
        "baseline-fifo",
        _fifo_baseline,
        2,
        ("base.json", "not a regular file"),
    ),
    ("baseline-not-json", lambda ws: _baseline(ws, "{ not json"), 2, ("base.json", "not valid JSON")),
    (
        "baseline-foreign",
        lambda ws: _baseline(ws, '{"format": "something-else"}'),
        2,
        ("base.json", "not a sae-acceptance baseline"),
    ),
    (
        "baseline-missing",
        lambda ws: (ws.toml.write_text('baseline = "gone.json"\n' + ws.toml.read_text()), ws.config_argv())[1],
        2,
        ("gone.json", "no such baseline"),
    ),
    ("baseline-other-tokens", _other_tokens_baseline, 2, ("base.json", "measured on something else", "tokens")),
    ("baseline-d_in", _baseline_d_in, 2, ("base.json", "saes.good.sums.d_in", "'wide'")),
    (
        "baseline-sidecar-bomb",
        lambda ws: (_claims_gigabytes(_written_baseline(ws).with_suffix(".npz")), ws.config_argv())[1],
        2,
        ("base.npz", "unpack to 4,294,9"),
    ),
    # merge
    (
        "merge-count-billion",
        lambda ws: ["merge", str(_shard_report(ws, lambda d: d["shard"].update(count=10**9)))],
        2,
        ("s1.json", "missing"),
    ),
    (
        "merge-count-float",
        lambda ws: ["merge", str(_shard_report(ws, lambda d: d["shard"].update(count=1e9)))],
        2,
        ("s1.json", "whole numbers"),
    ),
    ("merge-report-fifo", lambda ws: ["merge", str(_fifo(_shard_report(ws)))], 2, ("s1.json", "not a regular file")),
    (
        "merge-densities-bomb",
        lambda ws: (
            _claims_gigabytes(_shard_report(ws).with_name("s1.good.densities.npz")),
            ["merge", str(ws.root / "shards" / "s1.json")],
        )[1],
        2,
        ("s1.good.densities.npz", "unpack to"),
    ),
    # outputs
    ("json-into-directory", lambda ws: ws.config_argv("--json", str(ws.root)), 2, ("ws", "is a directory")),
    ("json-into-proc", lambda ws: ws.config_argv("--json", "/proc/r.json"), 2, ("/proc/r.json", "cannot write")),
    (
        "json-under-a-file",
        lambda ws: ws.config_argv("--json", str(ws.root / "tokens.npy" / "r.json")),
        2,
        ("tokens.npy",),
    ),
    ("schema-into-directory", lambda ws: ["schema", "--out", str(ws.root)], 2, ("is a directory",)),
    # CLI flags
    ("eval-nothing", lambda ws: ["eval"], 2, ("eval needs --config",)),
    ("eval-unknown-flag", lambda ws: ["eval", "--bogus"], 2, ("--bogus",)),
    ("eval-not-a-number", lambda ws: ["eval", "--n-sequences", "many"], 2, ("--n-sequences", "'many'")),
    ("eval-config-and-flags", lambda ws: ws.config_argv("--model", "x"), 2, ("drop --model",)),
    ("eval-update-baseline-value", lambda ws: ws.config_argv("--update-baseline=always"), 2, ("--update-baseline",)),
    ("train-k-zero", lambda ws: _train(ws, "--k", "0"), 2, ("k", "greater than 0")),
    ("train-k-above-d_sae", lambda ws: _train(ws, "--k", "10000"), 2, ("--k 10000", "d_sae")),
    (
        "train-hook-missing",
        lambda ws: _train(ws, "--hook", "blocks.9.hook_resid_post"),
        2,
        ("blocks.9.hook_resid_post",),
    ),
    ("train-tokens-zero", lambda ws: _train(ws, "--train-tokens", "0"), 2, ("--train-tokens",)),
    (
        "train-no-k",
        lambda ws: ["train", "--model", "m", "--hook", HOOK, "--data", "d.npy", "--train-tokens", "1", "--out", "o"],
        2,
        ("--k",),
    ),
    (
        "sweep-unknown-profile",
        lambda ws: ["sweep", "--profile", "nonesuch", "--out", str(ws.root / "out")],
        2,
        ("nonesuch",),
    ),
    (
        "sweep-bad-profile",
        lambda ws: (
            _garbage(ws.root / "p.toml", b"ks = [\n"),
            ["sweep", "--profile", str(ws.root / "p.toml"), "--out", str(ws.root / "out")],
        )[1],
        2,
        ("p.toml",),
    ),
    ("pr-profile-no-data", lambda ws: ["pr-profile", "--model", str(ws.model)], 2, ("needs --data",)),
    (
        "pr-profile-bad-model",
        lambda ws: ["pr-profile", "--model", str(ws.root / "nomodel"), "--data", str(ws.root / "tokens.npy")],
        2,
        ("nomodel",),
    ),
    (
        "pr-profile-context",
        lambda ws: [
            "pr-profile",
            "--model",
            str(ws.model),
            "--data",
            str(ws.root / "tokens.npy"),
            "--context-size",
            "1",
        ],
        2,
        ("pr-profile", "context_size"),
    ),
]


@pytest.mark.parametrize(("mistake", "expected", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_mistake_is_one_line_and_status_2(ws, capsys, monkeypatch, mistake, expected, named):
    argv = mistake(ws)
    capsys.readouterr()
    answers = io.StringIO("y\n" * 8)  # what a prompt would read: nothing may
    monkeypatch.setattr(sys, "stdin", answers)
    status = main(argv)
    captured = capsys.readouterr()
    assert answers.tell() == 0, "read standard input"
    assert status == expected, captured.err + captured.out
    one_line(captured.err, *named)
    assert "allow_pickle" not in captured.err and "Traceback" not in captured.out
    assert "weights_only=False" not in captured.err  # never the unsafe fix
    assert " 0 tokens/s" not in captured.out
    no_leftovers(ws.root)


@pytest.mark.parametrize("model_type", ["evil", "gpt_neox"])
def test_remote_code_never_runs_nor_asks_on_a_terminal(ws, model_type):
    """The real CLI with a pipe answering "y" on standard input: a checkpoint that needs its own
    code is refused in one line; one whose model_type transformers has built in loads without it."""
    _remote_code(ws, model_type)
    code = "import sys; from sae_acceptance.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *ws.config_argv()], input="y\n" * 8, capture_output=True, text=True, timeout=300
    )
    assert not (ws.root / MARKER).exists()
    if model_type == "evil":
        assert done.returncode == 2, done.stderr
        one_line(done.stderr, "config.json", "auto_map")
    else:
        assert done.returncode == 0, done.stderr
    assert "[y/N]" not in done.stdout + done.stderr
    no_leftovers(ws.root)


def test_fields_of_a_newer_version_are_ignored_with_a_note(ws, capsys):
    """A shard report and a baseline with fields this version does not read: merged and compared
    as before, each reader saying once what it skipped."""
    shard = _shard_report(ws, lambda d: (d.update(written_by="v9"), d["saes"]["good"].update(novel=[1, 2])))
    capsys.readouterr()
    assert main(["merge", str(shard)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "ignored fields" in line]
    assert len(notes) == 1 and "written_by" in notes[0] and "saes.good.novel" in notes[0], out
    path = _written_baseline(ws)
    data = json.loads(path.read_text())
    data["comment"] = "from a newer version"
    data["saes"]["good"]["novel"] = {"x": 1}
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(ws.config_argv()) == 0
    one_line(capsys.readouterr().err, "base.json", "ignored fields", "comment", "saes.good.novel")
    no_leftovers(ws.root)


def test_update_over_a_corrupt_baseline_is_refused_and_leaves_it(ws, capsys):
    ws.toml.write_text('baseline = "base.json"\n' + ws.toml.read_text())
    (ws.root / "base.json").write_text("{ corrupt")
    assert main(ws.config_argv("--update-baseline")) == 2
    one_line(capsys.readouterr().err, "base.json", "force")
    assert (ws.root / "base.json").read_text() == "{ corrupt"
    assert main(ws.config_argv("--update-baseline=force")) == 0
    assert json.loads((ws.root / "base.json").read_text())["format"] == "sae-acceptance-baseline"
    no_leftovers(ws.root)


def test_a_hook_override_warns_in_one_line(ws, capsys):
    ws.sae("good", identity_sae(hook="blocks.0.hook_resid_post"))
    ws.append(f'hook = "{HOOK}"\n')
    assert main(ws.config_argv()) == 0
    err = capsys.readouterr().err
    one_line(err, "good", f"evaluated at {HOOK}", "trained at blocks.0.hook_resid_post")


# pytest: the same mistakes give exit status 2 and one line, the summary survives.
PYTEST_CASES = [
    ("pytest-json-into-directory", ("--sae-json", "."), "is a directory"),
    ("pytest-json-into-proc", ("--sae-json", "/proc/r.json"), "/proc/r.json"),
    ("pytest-json-unwritable", ("--sae-json", "/sys/r/r.json"), "/sys/r"),
]


@pytest.mark.parametrize(("flags", "named"), [c[1:] for c in PYTEST_CASES], ids=[c[0] for c in PYTEST_CASES])
def test_pytest_output_mistakes_are_status_2_and_keep_the_summary(pytester, pristine, flags, named):
    shutil.copytree(pristine, pytester.path, dirs_exist_ok=True)
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider", *flags)
    assert result.ret == 2, result.stdout.str()
    errors = [line for line in result.stdout.lines if line.startswith("ERROR sae-acceptance:")]
    assert len(errors) == 1 and named in errors[0] and len(errors[0]) < 300, result.stdout.str()
    assert "Traceback" not in result.stdout.str() and "INTERNALERROR" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*SAE acceptance*", "*good*PASS*"])
    no_leftovers(pytester.path)


def test_pytest_input_error_is_status_2_and_a_failed_gate_1(pytester, pristine):
    shutil.copytree(pristine, pytester.path, dirs_exist_ok=True)
    save_sae(identity_sae(d=16, hook=HOOK), pytester.path / "good")
    result = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*SAE d_in = 16 but hook blocks.1.hook_resid_post has width 32*"])
    save_sae(random_topk_sae(k=1, hook=HOOK, scale=3.0), pytester.path / "good")
    assert pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider").ret == 1


def test_pytest_collects_a_thresholds_file_named_on_the_command_line(pytester, pristine):
    shutil.copytree(pristine, pytester.path, dirs_exist_ok=True)
    (pytester.path / "thresholds.toml").rename(pytester.path / "gate.toml")
    result = pytester.runpytest("gate.toml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert result.ret == 0


def test_escalated_r2_warning_is_a_short_failure(pytester, pristine):
    shutil.copytree(pristine, pytester.path, dirs_exist_ok=True)
    (pytester.path / "thresholds.toml").write_text(
        (pytester.path / "thresholds.toml").read_text().replace("[[sae]]", "[canyon]\nthreshold = 0.99\n\n[[sae]]", 1)
    )
    result = pytester.runpytest(
        "thresholds.toml", "-p", "no:cacheprovider", "-W", "error::sae_acceptance.R2ProxyWarning"
    )
    assert result.ret == 1
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["*FAILED thresholds.toml::good::r2*"])
    assert "_hooks.py" not in out and "Traceback" not in out and len(result.stdout.lines) < 60, out


def test_escalated_hook_override_is_a_short_failure_of_each_item_evaluated_once(pytester, pristine):
    shutil.copytree(pristine, pytester.path, dirs_exist_ok=True)
    save_sae(identity_sae(hook="blocks.0.hook_resid_post"), pytester.path / "good")
    toml = pytester.path / "thresholds.toml"
    toml.write_text(toml.read_text().replace('path = "good"', f'path = "good"\nhook = "{HOOK}"'))
    pytester.makeconftest(
        "import sae_acceptance.evaluate as evaluate\n"
        "_real = evaluate.evaluate\n"
        "def _counting(*args, **kwargs):\n"
        "    print('EVALUATING')\n"
        "    return _real(*args, **kwargs)\n"
        "evaluate.evaluate = _counting\n"
    )
    result = pytester.runpytest_subprocess(
        "thresholds.toml",
        "-p",
        "no:cacheprovider",
        "-s",  # a fresh import
        "-W",
        "error::sae_acceptance.HookOverrideWarning",
    )
    assert result.ret == 1
    out = result.stdout.str()
    assert out.count("EVALUATING") == 1, out
    result.stdout.fnmatch_lines(
        [
            f"good: evaluated at {HOOK}, but *good was trained at blocks.0.hook_resid_post*",
            "*FAILED thresholds.toml::good::ce_rec*",
        ]
    )
    assert "Traceback" not in out and "evaluate.py" not in out and len(result.stdout.lines) < 60, out


def test_interrupted_run_writes_no_baseline(pytester, pristine):
    """Ctrl-C after the SAE items ran: pytest says interrupted, the baseline is not written."""
    shutil.copytree(pristine, pytester.path, dirs_exist_ok=True)
    pytester.makepyfile(test_zz_interrupt="def test_ctrl_c():\n    raise KeyboardInterrupt\n")
    # in a subprocess: an in-process KeyboardInterrupt would also stop an xdist worker running this test
    result = pytester.runpytest_subprocess(
        "thresholds.toml", "test_zz_interrupt.py", "-p", "no:cacheprovider", "--sae-update-baseline"
    )
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    assert not (pytester.path / "thresholds.baseline.json").exists()
    no_leftovers(pytester.path)
