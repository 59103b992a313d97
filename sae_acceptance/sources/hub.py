"""SAEs on the Hugging Face Hub -> local directories, through huggingface_hub's cache.

Two ways to name one, beside a local path:

- ``hf://owner/repo[@revision][/folder]``: a folder of a model repository, in
  SAELens or sparsify layout; only that folder's files are downloaded;
- ``sae-lens://release/sae_id``: SAELens's pretrained-SAE directory names the
  repository and folder (needs sae-lens installed).

Downloads go through `huggingface_hub.snapshot_download`, so its cache, token,
``HF_HUB_OFFLINE=1`` (a warm cache, no network) and ``HF_ENDPOINT`` all apply.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable
from pathlib import Path

from sae_acceptance.errors import SAEFormatError

HF_PREFIX = "hf://"
SAELENS_PREFIX = "sae-lens://"


def is_remote(spec: str | Path) -> bool:
    """Whether `spec` names an SAE on the Hugging Face Hub rather than a local directory."""
    return str(spec).startswith((HF_PREFIX, SAELENS_PREFIX))


def locate_sae(spec: str | Path) -> Path:
    """The local directory of an SAE: a path as given, or a hub folder fetched into the cache."""
    text = str(spec)
    if text.startswith(SAELENS_PREFIX):
        repo_id, folder = _saelens_location(text)
        return _fetch(text, repo_id, None, folder)
    if text.startswith(HF_PREFIX):
        parts = text[len(HF_PREFIX) :].strip("/").split("/")
        if len(parts) < 2 or not all(parts):
            raise SAEFormatError(f"{text}: expected hf://<owner>/<repo>[@<revision>][/<folder>]")
        name, _, revision = parts[1].partition("@")
        return _fetch(text, f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]))
    return Path(text)


def _fetch(spec: str, repo_id: str, revision: str | None, folder: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{folder}/*"] if folder else None)
    except Exception as err:  # offline without a cached copy, no such repo or revision, HTTP
        at = f"{repo_id}@{revision}" if revision else repo_id
        raise SAEFormatError(f"{spec}: cannot fetch {at} from the Hugging Face Hub ({type(err).__name__}: {err})") from err
    path = Path(root) / folder
    if not path.is_dir():
        raise SAEFormatError(f"{spec}: the repository {repo_id} has no folder {folder!r}")
    return path


def _saelens_location(spec: str) -> tuple[str, str]:
    """(repository, folder) of a SAELens release id, from SAELens's own directory."""
    release, _, sae_id = spec[len(SAELENS_PREFIX) :].partition("/")
    if not release or not sae_id:
        raise SAEFormatError(f"{spec}: expected sae-lens://<release>/<sae_id>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise SAEFormatError(
            f"{spec}: SAELens release ids need sae-lens installed (pip install sae-lens); "
            "or name the folder directly: hf://<owner>/<repo>/<folder>"
        ) from None
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAEFormatError(f"{spec}: no SAELens release {release!r}{_did_you_mean(release, directory)}")
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        raise SAEFormatError(f"{spec}: release {release!r} has no SAE {sae_id!r}{_did_you_mean(sae_id, lookup.saes_map)}")
    if lookup.conversion_func not in (None, "sae_lens"):
        raise SAEFormatError(
            f"{spec}: release {release!r} is stored in a format SAELens converts on load "
            f"({lookup.conversion_func!r}), not in SAELens's own; load it with SAELens "
            "and save it with `SAE.save_model` to a directory, then give that directory"
        )
    return lookup.repo_id, lookup.saes_map[sae_id]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
