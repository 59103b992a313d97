"""Reading weight files without running anything: safetensors, npz without pickles, torch tensors only."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from sae_acceptance.errors import SAEAcceptanceError, SAEFormatError
from sae_acceptance.io import read_json, regular_file

_TORCH_LOAD = torch.load  # the real one: `converters` swaps torch.load for `tensors_only_load` while SAELens runs


def weights_file(file: Path) -> Path:
    """`file`, which must be a regular file: a FIFO would hang the reader, a device never ends."""
    regular_file(file, "a weights file", SAEFormatError)
    return file


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an unreadable file is a format error naming it."""
    weights_file(file)
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types
        raise SAEFormatError(f"{file}: not a readable safetensors file ({err})") from None


def read_npz(file: Path) -> dict[str, torch.Tensor]:
    """An .npz of plain arrays; object arrays would need unpickling and are refused."""
    weights_file(file)
    try:
        with np.load(file, allow_pickle=False) as data:
            return {name: torch.from_numpy(np.array(data[name])) for name in data.files}
    except ValueError as err:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise SAEFormatError(f"{file}: holds arrays that need unpickling ({err}); refused") from None
    except Exception as err:
        raise SAEFormatError(f"{file}: not a readable .npz file ({type(err).__name__}: {err})") from None


def tensors_only_load(file: Any, map_location: Any = None, **_: Any) -> Any:
    """`torch.load` restricted to tensors and plain containers: anything else is refused unrun."""
    try:
        return _TORCH_LOAD(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle_refused(file, err) from None
    except Exception as err:  # not a torch file at all
        raise SAEFormatError(f"{file}: not a readable torch file ({type(err).__name__}: {err})") from None


def pickle_refused(
    file: Path | str, err: pickle.UnpicklingError, error: type[SAEAcceptanceError] = SAEFormatError
) -> SAEAcceptanceError:
    """The one line for a pickle that `weights_only=True` refused: what it names, and never
    torch's advice (retry with `weights_only=False`, or allow-list the global), which runs it."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    named = f" (it names {found.group(1)})" if found else ""
    return error(f"{file}: holds Python objects other than tensors; refused without running it{named}")


def read_torch(file: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict (name -> tensor), read with `weights_only=True`."""
    state = tensors_only_load(weights_file(file), map_location="cpu")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SAEFormatError(f"{file}: expected a dict of named tensors, got {type(state).__name__}")
    return dict(state)


def require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], file: Path | str) -> None:
    """A format error naming the file and the missing tensors, unless all `names` are there."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{file}: missing tensor(s) {', '.join(missing)} (has {', '.join(sorted(tensors))})")


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, or one SAEFormatError naming the file (and line)."""
    if not file.exists():
        raise SAEFormatError(f"{file.parent}: no {file.name} in the SAE directory")
    value = read_json(file, "an SAE config", error=SAEFormatError)
    if not isinstance(value, dict):
        raise SAEFormatError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def whole_number(value: Any, what: str, where: Path | str) -> int | None:
    """`value` as an int (a one-element tensor or an integral float accepted); None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise SAEFormatError(f"{where}: {what} must be a whole number, got {value!r}")
    return int(value)
