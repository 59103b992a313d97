"""SAEs on the Hugging Face Hub -> local directories, through huggingface_hub's cache.

Two ways to name one, beside a local path:

- ``hf://owner/repo[@revision][/folder]``: a folder of a model repository, in
  any layout `formats/layouts.py` reads; only that folder's SAE files are downloaded;
- ``sae-lens://release/sae_id``: an entry of SAELens's pretrained-SAE directory
  (needs sae-lens installed), loaded by `formats/converters.py`.

Downloads go through `huggingface_hub.snapshot_download`, so its cache, token,
``HF_HUB_OFFLINE=1`` (a warm cache, no network) and ``HF_ENDPOINT`` all apply.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.formats.layouts import SAE_FILES, has_sae_files
from sae_acceptance.sources.spec import (  # noqa: F401  (is_remote re-exported)
    HF_PREFIX,
    SAELENS_PREFIX,
    is_remote,
    parse_hf,
    parse_saelens,
)


def locate_sae(spec: str | Path) -> Path:
    """The local directory of an SAE: a path as given, or an ``hf://`` folder fetched into the cache.

    A ``sae-lens://`` id names no directory of ours (SAELens's converter reads it): see `saelens_entry`."""
    text = str(spec)
    if text.startswith(SAELENS_PREFIX):
        raise SAEFormatError(f"{text}: a SAELens release id is loaded by its converter, not located as a folder")
    if text.startswith(HF_PREFIX):
        return fetch_folder(text, *parse_hf(text))
    return Path(text)


def download_folder(spec: str, repo_id: str, revision: str | None, folder: str, patterns: Iterable[str]) -> Path:
    """The files of `folder` matching `patterns` (nothing else of the repository), downloaded
    into the hub cache; the folder's path, which must lie inside that cache."""
    # lazy on purpose: huggingface_hub is imported only when something is fetched
    from huggingface_hub import constants, snapshot_download

    prefix = f"{folder}/" if folder else ""
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + p for p in patterns])
    except Exception as err:  # offline without a cached copy, no such repo or revision, HTTP
        at = f"{repo_id}@{revision}" if revision else repo_id
        raise SAEFormatError(
            f"{spec}: cannot fetch {at} from the Hugging Face Hub ({type(err).__name__}: {err})"
        ) from err
    return _inside_cache(spec, Path(root) / folder, Path(constants.HF_HUB_CACHE))


def fetch_folder(spec: str, repo_id: str, revision: str | None, folder: str) -> Path:
    """Download the SAE files of `folder` (nothing else of the repository) and return its path."""
    from huggingface_hub import constants

    path = download_folder(spec, repo_id, revision, folder, SAE_FILES)
    if not has_sae_files(path):
        where = f"folder {folder!r}" if folder else "top level"
        if constants.HF_HUB_OFFLINE:
            raise SAEFormatError(
                f"{spec}: the cached copy of {repo_id} has no SAE files at its {where} "
                "(HF_HUB_OFFLINE is set: they may be on the hub, not yet downloaded)"
            )
        raise SAEFormatError(f"{spec}: {repo_id} has no SAE files ({', '.join(SAE_FILES)}) at its {where}")
    return path


def _inside_cache(spec: str, path: Path, cache: Path) -> Path:
    """`path`, which must lie inside the hub cache once resolved: a revision or ref that steps
    out of it would have the gate read a folder from anywhere on disk."""
    if not path.resolve().is_relative_to(cache.expanduser().resolve()):
        raise SAEFormatError(f"{spec}: resolved to {path.resolve()}, outside the Hugging Face cache {cache}; refused")
    return path


def saelens_entry(spec: str) -> tuple[Any, str, str]:
    """(SAELens's directory entry, release, SAE id) of a ``sae-lens://`` id."""
    release, sae_id = parse_saelens(spec)
    lookup = saelens_release(spec, release)
    if sae_id not in lookup.saes_map:
        raise SAEFormatError(
            f"{spec}: release {release!r} has no SAE {sae_id!r}{_did_you_mean(sae_id, lookup.saes_map)}"
        )
    return lookup, release, sae_id


def saelens_release(spec: str, release: str) -> Any:
    """SAELens's directory entry of `release` (`spec` names it in errors)."""
    try:
        # lazy on purpose: sae-lens is optional, needed only for sae-lens:// ids
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
    return directory[release]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
