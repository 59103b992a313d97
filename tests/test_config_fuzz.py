"""Property: any TOML document, or any mutation of the embedded thresholds.toml, loads as a
valid config or fails with one `ConfigError` naming the file and a line, never another exception."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import ConfigError

EMBEDDED = (REPO / "thresholds.toml").read_text()
LINES = EMBEDDED.splitlines()
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

keys = st.sampled_from(
    [
        "eval",
        "gate",
        "sae",
        "canyon",
        "regression",
        "baseline",
        "splice",
        "path",
        "name",
        "model",
        "hook",
        "data",
        "ce_rec",
        "cosine",
        "r2",
        "min",
        "max",
        "on",
        "expect_fail",
        "n_sequences",
        "tolerance",
        "threshold",
        "exclude_special_tokens",
        "device",
        "x",
    ]
)
scalars = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["reference/saes/L0-k32", "ci_low", "hf://a/b", "auto", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=6)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan" if value != value else ("inf" if value > 0 else "-inf") if abs(value) == float("inf") else repr(value)
        )
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def render(document: dict) -> str:
    """Top-level dicts as tables (a list of dicts as an array of tables), the rest as keys."""
    plain = [
        f"{k} = {toml_value(v)}"
        for k, v in document.items()
        if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))
    ]
    tables = []
    for k, v in document.items():
        if isinstance(v, dict):
            tables.append(f"[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items()))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables += [f"[[{k}]]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in x.items()) for x in v]
    return "\n".join(plain) + "\n\n" + "\n\n".join(tables) + "\n"


def check(workdir: Path, text: str) -> None:
    path = workdir / "thresholds.toml"
    path.write_text(text)
    try:
        load_thresholds(path)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(str(path)), message
        # a line number, except where the file cannot be read as TOML at all (tomllib names it inside)
        assert re.match(rf"{re.escape(str(path))}:\d+: ", message) or "not valid TOML" in message, message


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The embedded file's neighbours (model, tokens, SAEs) by link, so paths in it resolve."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "reference").symlink_to(REPO / "reference")
    shutil.copy(REPO / "thresholds.baseline.json", root)
    return root


@FUZZ
@given(document=documents)
def test_random_documents_are_valid_or_one_config_error(root, document):
    check(root, render(document))


mutations = st.lists(
    st.tuples(
        st.sampled_from(["delete", "duplicate", "replace", "insert", "truncate"]),
        st.integers(0, len(LINES) - 1),
        st.one_of(
            st.sampled_from(
                [
                    "min = 2",
                    'on = "median"',
                    "[[sae]]",
                    "[gate]",
                    "n_sequences = 0",
                    'path = "nowhere"',
                    'expect_fail = ["kl_div"]',
                    "ce_rec = { tolerance = -1 }",
                    "r2 = { min = 0.9 }",
                    "= 3",
                    'name = "a::b"',
                    "threshold = 2",
                    "[eval",
                    "baseline = 3",
                    "sae = 1",
                    "confidence = 1.5",
                    'saes = ["nope"]',
                    'dtype = "int8"',
                ]
            ),
            st.text(max_size=20),
        ),
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(edits=mutations)
def test_mutations_of_the_embedded_file_are_valid_or_one_config_error(root, edits):
    lines = list(LINES)
    for kind, at, text in edits:
        at = min(at, max(len(lines) - 1, 0))
        if not lines:
            lines = [text]
        elif kind == "delete":
            del lines[at]
        elif kind == "duplicate":
            lines.insert(at, lines[at])
        elif kind == "replace":
            lines[at] = text
        elif kind == "insert":
            lines.insert(at, text)
        else:
            lines[at] = lines[at][: len(lines[at]) // 2]
    check(root, "\n".join(lines) + "\n")
