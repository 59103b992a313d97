"""What a model is, for baselines and caches, known without loading it (no torch)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


def model_identity(name_or_path: str | Path | None) -> str | None:
    """What a model *is*, for baselines and caches: a hub name as given; a local checkpoint
    by a hash of its config and weight files' contents (a retrained checkpoint of the same
    shape is another model)."""
    if name_or_path is None or not Path(name_or_path).is_dir():
        return None if name_or_path is None else str(name_or_path)
    path = Path(name_or_path).resolve()
    files = [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.bin"))]
    stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return _content_hash(stamps)


@functools.lru_cache(maxsize=32)
def _content_hash(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the files' names and bytes; cached while their sizes and times stand."""
    digest = hashlib.sha256()
    for name, _, _ in stamps:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"local:{digest.hexdigest()[:16]}"
