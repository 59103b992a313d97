"""Regression baselines: what was measured, fingerprinted, and a paired test against it.

A baseline is two files meant to be committed beside thresholds.toml: a small,
pretty-printed JSON (`thresholds.baseline.json`) with each entry's fingerprint and
headline metric values, one block per entry so a diff shows which SAE moved, and a
binary sidecar next to it (`thresholds.baseline.npz`) with the per-sequence sums
and per-latent counts that a paired bootstrap needs. A retrained SAE is compared
on the same sequences: resample the sequence indices once, apply them to both
runs' sums. Two unpaired 95% intervals overlap almost always at 200 sequences;
the paired interval of the change does not, when the change is real.

The two files cannot be replaced in one step. A writer replaces the sidecar first
and keeps the previous one (`.prev.npz`) until the JSON that names the new one is
in place; a reader that meets a pair from two writes reads again until it sees a
whole one, so a gate reading while another process refreshes never fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sae_acceptance import __version__ as PROJECT_VERSION
from sae_acceptance.errors import BaselineError
from sae_acceptance.io import (
    REPORT_LIMIT,
    OutputError,
    ignored_fields_note,
    locked,
    npz_within,
    read_json,
    regular_file,
    remove_lock,
    signals_held,
    write_atomic,
)
from sae_acceptance.metrics import METRICS
from sae_acceptance.sources.identity import model_identity
from sae_acceptance.stats import SequenceSums, paired_changes
from sae_acceptance.verdict import RegressionCheck, Status, regression_check

if TYPE_CHECKING:
    from sae_acceptance.config import EvalSettings
    from sae_acceptance.results import EntryResult, EvalReport

FORMAT = "sae-acceptance-baseline"
# 3: sums in a binary sidecar; 2: sums inline in the JSON (read, and written as 3 on the next update).
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
# A refreshed entry whose fingerprint is the same and whose every metric value moved by at most
# this (relative) keeps its stored block as it was, byte for byte.
UNCHANGED_RTOL = 1e-6
SEP = "::"  # sidecar member names are "<entry>::<sum>" ("::" cannot occur in an entry's name)
# What must match for a comparison to mean anything; the rest is recorded for the reader.
MUST_MATCH = ("tokens", "model", "hook", "dtype", "excluded_ids", "n_sequences")
# How long a reader keeps reading a pair of files that come from two writes (a refresh under way).
TORN_READ_RETRY_S = 5.0


@dataclass(frozen=True)
class RefreshFlags:
    """How the caller's user refreshes a baseline (CLI and pytest spell it differently)."""

    refresh: str
    force: str
    strict: str


def add_refresh_options(add_option: Callable[..., Any], flags: RefreshFlags, dest: str) -> None:
    """Declare the refresh pair and the strict flag with ``add_option``: argparse's ``add_argument`` or a pytest option group's
    ``addoption``, which take the same arguments, so the CLI and the plugin offer the same two choices."""
    add_option(
        flags.refresh,
        action="store_const",
        const="refresh",
        dest=dest,
        default=None,
        help="write (or refresh) the regression baseline instead of comparing",
    )
    add_option(
        flags.force,
        action="store_const",
        const="force",
        dest=dest,
        help="the same, replacing a baseline that cannot be read",
    )
    add_option(flags.strict, action="store_true", help="fail SAEs that have no baseline entry")


def remedy(err: BaselineError, flags: RefreshFlags) -> str:
    """The error's message with the caller's own flag for what fixes it."""
    if err.remedy == "force":
        return f"{err} ({flags.force} replaces it)"
    if err.remedy == "refresh":
        return f"{err}; refresh with {flags.refresh}"
    return str(err)


@dataclass(frozen=True)
class BaselineEntry:
    """One entry of a baseline: what it was measured on, its metric values and its per-sequence sums."""

    fingerprint: dict[str, Any]
    metrics: dict[str, float | None]  # None: not finite when written
    sums: SequenceSums


@dataclass(frozen=True)
class Baseline:
    """A read baseline: where it is (for messages) and its entries, by entry key."""

    path: Path
    entries: dict[str, BaselineEntry]


def run_identity(result: EntryResult, settings: EvalSettings) -> dict[str, Any]:
    """What an entry was measured on (stored as an entry's "fingerprint")."""
    return {
        "tokens": result.tokens_fingerprint,
        "model": model_identity(result.model),
        "hook": result.hook,
        "dtype": settings.dtype,
        "excluded_ids": result.excluded_ids,
        "n_sequences": settings.n_sequences,
        "context_size": settings.context_size,
        "bootstrap": dataclasses.asdict(settings.bootstrap),
        "project_version": PROJECT_VERSION,
    }


def entry_for(result: EntryResult, settings: EvalSettings) -> BaselineEntry:
    """An entry's baseline entry. Metrics keep their values only: a comparison's interval comes
    from the paired bootstrap over the sums."""
    if result.sums is None:
        raise ValueError(f"{result.key}: no per-sequence sums (not evaluated in this process)")
    metrics = {name: m.to_dict()["value"] for name, m in result.metrics.items()}
    return BaselineEntry(run_identity(result, settings), metrics, result.sums)


def baseline_entries(report: EvalReport, settings: EvalSettings) -> dict[str, BaselineEntry]:
    """The baseline entries of a report's measured entries, by key (a splice's `splice:<name>`);
    an entry with an error has none."""
    return {
        result.key: entry_for(result, settings)
        for result in report.entries
        if result.error is None and result.sums is not None
    }


def sidecar_path(path: Path) -> Path:
    """The binary sidecar of the baseline JSON at `path`: same folder and stem, `.npz`."""
    return path.with_suffix(".npz")


def previous_sidecar(path: Path) -> Path:
    """The sidecar of the last complete write, while a new one is being written."""
    return path.with_suffix(".prev.npz")


def load_baseline(path: Path) -> Baseline:
    """Read and check a baseline (format 2 or 3); a corrupt or foreign file is one clear error."""
    path = Path(path)
    deadline = time.monotonic() + TORN_READ_RETRY_S
    while True:
        try:
            return _read(path)
        except _TornPair as torn:
            if time.monotonic() > deadline:
                raise BaselineError(str(torn), remedy="force") from None
            time.sleep(0.01)


# What a baseline of a format this version reads holds; anything else is ignored, with a note.
HEAD_KEYS = ("format", "version", "sidecar", "saes")
BLOCK_KEYS = ("fingerprint", "metrics", "sums")


class _TornPair(Exception):
    """The JSON and the sidecar come from different writes: a refresh may be under way."""


def _read(path: Path) -> Baseline:
    if not path.exists():
        raise BaselineError(f"{path}: no such baseline", remedy="refresh")
    try:
        payload = read_json(path, "a sae-acceptance baseline", limit=REPORT_LIMIT)
    except OutputError as err:
        raise BaselineError(str(err), remedy="force") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BaselineError(f'{path}: not a sae-acceptance baseline (no "format": "{FORMAT}")', remedy="force")
    version = payload.get("version")
    if version not in READ_VERSIONS:
        raise BaselineError(
            f"{path}: baseline format version {version}, this version reads {' and '.join(map(str, READ_VERSIONS))}",
            remedy="force",
        )
    blocks = payload.get("saes")
    if not isinstance(blocks, dict) or not all(isinstance(e, dict) for e in blocks.values()):
        raise BaselineError(f'{path}: no "saes" table', remedy="force")
    unknown = [k for k in payload if k not in HEAD_KEYS] + [
        f"saes.{name}.{k}" for name, block in blocks.items() for k in block if k not in BLOCK_KEYS
    ]
    if unknown:
        warnings.warn(ignored_fields_note(path, unknown), stacklevel=2)
    if version == 2:
        return Baseline(path, {name: _inline_entry(block, f"{path}: {name}") for name, block in blocks.items()})
    return Baseline(path, _with_sidecar(path, blocks))


def _inline_entry(block: dict[str, Any], where: str) -> BaselineEntry:
    """A format-2 block: its sums inline as lists."""
    try:
        stored = block["sums"]
        scalars = {name: np.asarray(values, dtype=np.float64) for name, values in stored["scalars"].items()}
        sums = SequenceSums(
            scalars=scalars, fired=np.asarray(stored["fired"], dtype=np.int64), d_in=int(stored["d_in"])
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BaselineError(f"{where}: malformed per-sequence sums (missing or bad {err})", remedy="force") from None
    return BaselineEntry(dict(block.get("fingerprint") or {}), _metric_values(block), sums)


def _metric_values(block: dict[str, Any]) -> dict[str, float | None]:
    metrics = block.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    return {name: (m.get("value") if isinstance(m, dict) else None) for name, m in metrics.items()}


def _with_sidecar(path: Path, blocks: dict[str, Any]) -> dict[str, BaselineEntry]:
    """Format 3's entries with their sums from the sidecar, or from the previous sidecar where a
    write stopped between the sidecar and the JSON (the JSON is then still the previous write's)."""
    try:
        return _with_sidecar_sums(path, blocks, sidecar_path(path))
    except _TornPair as err:
        first = err
    previous = previous_sidecar(path)
    if previous.exists():
        try:
            return _with_sidecar_sums(path, blocks, previous)
        except (_TornPair, BaselineError):
            pass
    raise first


def _with_sidecar_sums(path: Path, blocks: dict[str, Any], sidecar: Path) -> dict[str, BaselineEntry]:
    if sidecar.exists():
        regular_file(sidecar, "a baseline sidecar (.npz)", BaselineError)
        npz_within(sidecar, "a baseline sidecar", error=BaselineError)
    try:
        with np.load(sidecar, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise BaselineError(f"{sidecar}: missing (the sums of {path})", remedy="force") from None
    except Exception as err:  # zipfile, numpy and OS errors alike: the file is not a readable .npz
        raise BaselineError(f"{sidecar}: corrupt baseline sidecar ({type(err).__name__}: {err})", "force") from None
    out = {}
    for name, block in blocks.items():
        meta = block.get("sums")
        try:
            names = [str(n) for n in stored[f"{name}{SEP}names"]]
            table = _unplanes(stored[f"{name}{SEP}sums"], "f").reshape(len(names), -1)
            arrays = {f"scalars.{n}": row for n, row in zip(names, table, strict=True)}
            arrays["fired"] = _unplanes(stored[f"{name}{SEP}fired"], "u").astype(np.int64)
        except (KeyError, ValueError, TypeError) as err:
            raise _TornPair(f"{sidecar}: no readable sums for {name} ({err})") from None
        if not isinstance(meta, dict) or _digest(arrays) != meta.get("sha256"):
            raise _TornPair(
                f"{sidecar}: the sums of {name} do not match {path.name} (the two files come from different writes)"
            )
        scalars = {n: arrays[f"scalars.{n}"] for n in names}
        d_in = meta.get("d_in") or 0
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 0:
            raise BaselineError(f"{path}: saes.{name}.sums.d_in must be a whole number, got {d_in!r}", remedy="force")
        sums = SequenceSums(scalars=scalars, fired=arrays["fired"], d_in=d_in)
        out[name] = BaselineEntry(dict(block.get("fingerprint") or {}), _metric_values(block), sums)
    return out


def check_refreshable(path: Path) -> None:
    """Before a refresh: an existing baseline that cannot be read is not silently replaced."""
    if Path(path).exists():
        load_baseline(path)


def update_baseline(path: Path, entries: Mapping[str, BaselineEntry], force: bool = False) -> Path:
    """Fold `entries` into the baseline at `path` and write it (format 3) atomically, under a lock.

    Other entries are kept; an entry whose numbers did not move (`UNCHANGED_RTOL`) keeps its
    stored block byte for byte. An existing file that cannot be read (corrupt, foreign, an
    unknown version, a sidecar that does not match) is an error unless `force`, which replaces it.
    """
    path = Path(path)
    with signals_held():  # an interrupt waits for the files and the lock to be whole again
        try:
            with locked(path):
                stored: dict[str, BaselineEntry] = {}
                if path.exists():
                    try:
                        stored = load_baseline(path).entries
                    except BaselineError as err:
                        if not force:
                            raise BaselineError(f"{err} (not overwritten)", remedy="force") from None
                for name, entry in entries.items():
                    if name not in stored or _moved(stored[name], entry):
                        stored[name] = entry
                return write_baseline(path, stored)
        finally:
            remove_lock(path)


def write_baseline(path: Path, entries: Mapping[str, BaselineEntry]) -> Path:
    """Write exactly `entries` as a format-3 baseline: the sidecar first, then the JSON that
    names it (each atomic; the JSON holds each entry's digest, so a torn pair is detected)."""
    path = Path(path)
    sidecar = sidecar_path(path)
    blocks, arrays = {}, {}
    for name in sorted(entries):
        entry = entries[name]
        own = _arrays(entry.sums)
        arrays.update(_members(name, own))
        meta = {
            "d_in": entry.sums.d_in,
            "n_sequences": entry.sums.n_sequences,
            "d_sae": int(entry.sums.fired.size),
            "sha256": _digest(own),
        }
        metrics = {metric: {"value": value} for metric, value in entry.metrics.items()}
        blocks[name] = {"fingerprint": entry.fingerprint, "metrics": metrics, "sums": meta}
    previous = previous_sidecar(path)
    head = {"format": FORMAT, "version": FORMAT_VERSION, "sidecar": sidecar.name}
    with signals_held():
        kept = sidecar.exists()
        if kept:
            write_atomic(previous, sidecar.read_bytes())
        try:
            write_atomic(sidecar, _npz_bytes(arrays))
            written = write_atomic(path, _render(head, blocks))
        except BaseException:  # the previous pair again (a reader may still open it), nothing extra left
            if kept:
                os.replace(previous, sidecar)
            elif not path.exists():
                sidecar.unlink(missing_ok=True)
            raise
        previous.unlink(missing_ok=True)
    return written


def _arrays(sums: SequenceSums) -> dict[str, np.ndarray]:
    """An entry's stored arrays in their canonical dtypes (float64 sums, int64 counts)."""
    own = {f"scalars.{name}": np.ascontiguousarray(values, dtype=np.float64) for name, values in sums.scalars.items()}
    own["fired"] = np.ascontiguousarray(sums.fired, dtype=np.int64)
    return own


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(f"{key}:{arrays[key].dtype.str}:{arrays[key].shape}".encode())
        h.update(arrays[key].tobytes())
    return h.hexdigest()[:16]


def _planes(values: np.ndarray) -> np.ndarray:
    """Byte planes ([itemsize, n] uint8) of a little-endian array: each plane (the exponents,
    the high bytes of small counts) is nearly constant and compresses, as in HDF5's shuffle."""
    little = values.astype(values.dtype.newbyteorder("<"))
    return np.ascontiguousarray(little.view(np.uint8).reshape(-1, values.itemsize).T)


def _unplanes(planes: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(planes.T).view(np.dtype(f"<{kind}{planes.shape[0]}")).ravel()


def _members(name: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An entry's sidecar members: its sum names, its sums ([n_sums, n_seq] float64) and its
    per-latent counts (the smallest unsigned type that holds them), both as byte planes."""
    names = sorted(k.removeprefix("scalars.") for k in arrays if k.startswith("scalars."))
    fired = arrays["fired"]
    counts = fired.astype(np.min_scalar_type(int(fired.max()) if fired.size else 0))
    return {
        f"{name}{SEP}names": np.array(names, dtype=str),
        f"{name}{SEP}sums": _planes(np.stack([arrays[f"scalars.{n}"] for n in names]).ravel()),
        f"{name}{SEP}fired": _planes(counts),
    }


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz that depends only on the arrays (fixed member dates, sorted names),
    so an unchanged refresh rewrites the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, arrays[key], allow_pickle=False)
            archive.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue()


def _moved(old: BaselineEntry, new: BaselineEntry) -> bool:
    """Whether a refresh changes an entry: another fingerprint (the project's version aside),
    or a metric value beyond `UNCHANGED_RTOL`."""

    def identity(entry: BaselineEntry) -> dict[str, Any]:
        return {k: v for k, v in entry.fingerprint.items() if k != "project_version"}

    if identity(old) != identity(new) or set(old.metrics) != set(new.metrics):
        return True
    for name, b in new.metrics.items():
        a = old.metrics[name]
        if (a is None) != (b is None) or (
            a is not None and b is not None and not math.isclose(a, b, rel_tol=UNCHANGED_RTOL)
        ):
            return True
    return False


def _render(head: dict[str, Any], blocks: dict[str, Any]) -> str:
    """Pretty JSON a diff reads entry by entry: one block per entry, its fingerprint on one line,
    one line per metric."""

    def line(value: Any) -> str:
        return json.dumps(value, allow_nan=False)

    out = ["{"] + [f"  {line(k)}: {line(v)}," for k, v in head.items()] + ['  "saes": {']
    for i, (name, entry) in enumerate(blocks.items()):
        metrics = list(entry["metrics"].items())
        out += [f"    {line(name)}: {{", f'      "fingerprint": {line(entry["fingerprint"])},', '      "metrics": {']
        out += [
            f"        {line(m)}: {line(v)}{',' if j < len(metrics) - 1 else ''}" for j, (m, v) in enumerate(metrics)
        ]
        out += ["      },", f'      "sums": {line(entry["sums"])}', "    }" + ("," if i < len(blocks) - 1 else "")]
    return "\n".join([*out, "  }", "}"]) + "\n"


def compare_entry(
    baseline: Baseline,
    result: EntryResult,
    settings: EvalSettings,
    tolerances: Mapping[str, float | None],
    strict: bool,
    flags: RefreshFlags,
) -> dict[str, RegressionCheck]:
    """Each metric of `tolerances` (None: its default tolerance) against the baseline.

    A metric fails when it is worse than the baseline by more than its tolerance, with the
    whole paired interval of the change beyond the tolerance. One paired bootstrap serves
    every metric of the entry. Raises `BaselineError` when the entry cannot be compared at all
    (measured on something else).
    """
    where = str(baseline.path)
    entry = baseline.entries.get(result.key)
    if entry is None:
        message = f"{result.key}: no baseline entry in {where} (a new SAE)"
        status = Status.MISSING if strict else Status.NEW
        return {m: RegressionCheck(m, status, message) for m in tolerances}
    differs = [key for key in MUST_MATCH if entry.fingerprint.get(key) != run_identity(result, settings).get(key)]
    if differs:
        current = run_identity(result, settings)
        detail = "; ".join(f"{k}: baseline {entry.fingerprint.get(k)!r}, now {current.get(k)!r}" for k in differs)
        raise BaselineError(f"{where}: {result.key} was measured on something else ({detail})", remedy="refresh")
    if result.sums is None:
        raise ValueError(f"{result.key}: no per-sequence sums to compare")
    bootstrap = settings.bootstrap
    paired = {}
    if any(METRICS[m].has_ci for m in tolerances):
        paired = paired_changes(result.sums, entry.sums, bootstrap)
    checks = {}
    for metric, tolerance in tolerances.items():
        before = entry.metrics.get(metric)
        if before is None:  # absent, or not finite when the baseline was written (JSON null)
            message = f"{where}: {result.key} has no value for {metric}; refresh with {flags.refresh}"
            checks[metric] = RegressionCheck(metric, Status.MISSING, message)
            continue
        change = paired.get(metric)
        checks[metric] = regression_check(
            metric,
            before,
            result.metrics[metric].value,
            None if change is None or not METRICS[metric].has_ci else (change.change, change.ci),
            bootstrap.confidence,
            METRICS[metric].tolerance if tolerance is None else tolerance,
        )
    return checks
