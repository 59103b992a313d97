"""Hub names of SAEs, parsed without loading anything (config files check them early).

- ``hf://owner/repo[@revision][/folder]``: a folder of a model repository;
- ``sae-lens://release/sae_id``: an entry of SAELens's pretrained-SAE directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from sae_acceptance.errors import SAEFormatError

HF_PREFIX = "hf://"
SAELENS_PREFIX = "sae-lens://"


def is_remote(spec: str | Path) -> bool:
    """Whether `spec` names an SAE on the Hugging Face Hub rather than a local directory."""
    return str(spec).startswith((HF_PREFIX, SAELENS_PREFIX))


def check_spec(spec: str) -> None:
    """Raise SAEFormatError for a malformed hub name; no network (config files check early)."""
    if spec.startswith(SAELENS_PREFIX):
        parse_saelens(spec)
    elif spec.startswith(HF_PREFIX):
        parse_hf(spec)


def default_name(spec: str) -> str:
    """A name for a hub SAE without one: the repository (or release) and folder (or SAE id)."""
    if spec.startswith(SAELENS_PREFIX):
        release, sae_id = parse_saelens(spec)
        parts = [release, *sae_id.split("/")]
    else:
        repo_id, _, folder = parse_hf(spec)
        parts = [repo_id.split("/")[1], *folder.split("/")]
    return "-".join(p for p in parts if p)


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf://owner/repo[@revision][/folder]`` -> (repo id, revision or None, folder).

    A revision holding a slash is written percent-encoded (``refs%2Fpr%2F3``). Every part is
    checked as huggingface_hub will use it, percent-decoded: a revision or folder that steps out
    with ``..`` (``@..%2F..%2Fref``) would make it read files outside its cache."""
    parts = spec[len(HF_PREFIX) :].strip("/").split("/")
    expected = f"{spec}: expected hf://<owner>/<repo>[@<revision>][/<folder>]"
    if len(parts) < 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise SAEFormatError(expected)
    if parts[0] in ("datasets", "spaces"):
        raise SAEFormatError(f"{spec}: SAEs are read from model repositories, not {parts[0]}")
    name, at, revision = parts[1].partition("@")
    if not name or (at and not revision):
        raise SAEFormatError(expected)
    for what, value in (("owner", parts[0]), ("repository", name)):
        if not REPO_PART.fullmatch(unquote(value)):
            raise SAEFormatError(f"{spec}: its {what} {unquote(value)!r} is not a repository name; refused")
    _check_segments(spec, "revision", unquote(revision).split("/") if revision else [])
    _check_segments(spec, "folder", [s for p in parts[2:] for s in unquote(p).split("/")])
    return f"{parts[0]}/{name}", unquote(revision) if revision else None, "/".join(parts[2:])


def parse_saelens(spec: str) -> tuple[str, str]:
    """``sae-lens://release/sae_id`` -> (release, SAE id); the id may hold slashes."""
    release, _, sae_id = spec[len(SAELENS_PREFIX) :].partition("/")
    expected = f"{spec}: expected sae-lens://<release>/<sae_id>"
    if not release or not sae_id:
        raise SAEFormatError(expected)
    _check_segments(spec, "release", [unquote(release)])
    _check_segments(spec, "SAE id", unquote(sae_id).split("/"))
    return release, sae_id


def parse_saelens_release(spec: str) -> str:
    """``sae-lens://release`` (a whole release: a CLT is read whole, not one layer) -> the release."""
    release = spec[len(SAELENS_PREFIX) :].strip("/")
    if not release or "/" in release:
        raise SAEFormatError(f"{spec}: expected sae-lens://<release> (a CLT is read whole, not one layer)")
    _check_segments(spec, "release", [unquote(release)])
    return release


# A Hugging Face repository's owner or name: letters, digits, '-', '_' and '.', not '.' or '..'.
REPO_PART = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]{1,96}")


def _check_segments(spec: str, what: str, segments: list[str]) -> None:
    """Refuse an empty, `.` or `..` segment, a backslash or a control character (decoded parts)."""
    for segment in segments:
        if segment in ("", ".", "..") or "\\" in segment or any(ord(c) < 32 or ord(c) == 127 for c in segment):
            raise SAEFormatError(f"{spec}: its {what} has a part {segment!r} once percent-decoded; refused")
