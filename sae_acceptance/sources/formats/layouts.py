"""Which format a directory holds, told from its files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.formats import dictionary_learning, gemma_scope, saelens, sparsify
from sae_acceptance.sources.sae import SAE

# (name, the weights file that identifies it, every file it reads, reader)
LAYOUTS: tuple[tuple[str, str, tuple[str, ...], Callable[[Path], SAE]], ...] = (
    ("SAELens", saelens.WEIGHTS, ("cfg.json", saelens.WEIGHTS), saelens.read_directory),
    ("sparsify", sparsify.WEIGHTS, ("cfg.json", sparsify.WEIGHTS), sparsify.read_directory),
    (
        "dictionary_learning",
        dictionary_learning.WEIGHTS,
        (dictionary_learning.WEIGHTS, dictionary_learning.CONFIG),
        dictionary_learning.read_directory,
    ),
    ("Gemma Scope", gemma_scope.WEIGHTS, (gemma_scope.WEIGHTS,), gemma_scope.read_directory),
)
SAE_FILES = tuple(dict.fromkeys(f for _, _, files, _ in LAYOUTS for f in files))
EXPECTED = "; ".join(f"{' + '.join(files)} ({name})" for name, _, files, _ in LAYOUTS)


def has_sae_files(path: Path) -> bool:
    """Whether `path` holds the weights file of any known layout."""
    return any((path / weights).is_file() for _, weights, _, _ in LAYOUTS)


def read_directory(path: Path) -> SAE:
    """The SAE in directory `path`, in whichever layout its weights file names."""
    if not path.exists():
        raise SAEFormatError(f"{path}: no such SAE directory")
    if path.is_file():
        raise SAEFormatError(f"{path}: expected a directory holding one of: {EXPECTED}")
    for _, weights, _, reader in LAYOUTS:
        if (path / weights).exists() and not (path / weights).is_dir():  # a pipe or device: refused by name
            return reader(path)
    raise SAEFormatError(f"{path}: no SAE weights; expected one of: {EXPECTED}")
