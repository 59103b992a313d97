"""Regression baselines: what was measured, fingerprinted, and a paired test against it.

A baseline is two files meant to be committed beside thresholds.toml: a small,
pretty-printed JSON (`thresholds.baseline.json`) with each SAE's fingerprint and
headline metric values, one block per SAE so a diff shows which SAE moved, and a
binary sidecar next to it (`thresholds.baseline.npz`) with the per-sequence sums
and per-latent counts that a paired bootstrap needs. A retrained SAE is compared
on the same sequences: resample the sequence indices once, apply them to both
runs' sums. Two unpaired 95% intervals overlap almost always at 200 sequences;
the paired interval of the change does not, when the change is real.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_acceptance import __version__ as PROJECT_VERSION
from sae_acceptance.config import splice_key
from sae_acceptance.errors import BaselineError
from sae_acceptance.io import OutputError, locked, read_json, remove_lock, write_atomic
from sae_acceptance.metrics import METRICS
from sae_acceptance.results import EvalReport, SAEResult
from sae_acceptance.sources.model import model_identity
from sae_acceptance.stats import BootstrapSettings, SequenceSums, paired_changes

FORMAT = "sae-acceptance-baseline"
# 3: sums in a binary sidecar; 2: sums inline in the JSON (read, and written as 3 on the next update).
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
# A refreshed SAE whose fingerprint is the same and whose every metric value moved by at most
# this (relative) keeps its stored entry as it was, byte for byte.
UNCHANGED_RTOL = 1e-6
SEP = "::"  # sidecar member names are "<sae>::<sum>" ("::" cannot occur in an SAE's name)
# What must match for a comparison to mean anything; the rest is recorded for the reader.
MUST_MATCH = ("tokens", "model", "hook", "dtype", "excluded_ids", "n_sequences")
REFRESH = "refresh with --sae-update-baseline"


def run_identity(result: SAEResult, settings: dict[str, Any]) -> dict[str, Any]:
    """What the SAE was measured on (stored as an entry's "fingerprint")."""
    return {
        "tokens": result.tokens_fingerprint,
        "model": model_identity(result.model),
        "hook": result.hook,
        "dtype": settings.get("dtype"),
        "excluded_ids": result.excluded_ids,
        "n_sequences": settings.get("n_sequences"),
        "context_size": settings.get("context_size"),
        "bootstrap": settings.get("bootstrap"),
        "project_version": PROJECT_VERSION,
    }


def entry_for(result: SAEResult, settings: dict[str, Any]) -> dict[str, Any]:
    """One SAE's baseline entry as plain data (lists, so xdist workers can send it). Metrics keep
    their values only: a comparison's interval comes from the paired bootstrap over the sums."""
    sums = result.sums
    return {
        "fingerprint": run_identity(result, settings),
        "metrics": {name: {"value": m.to_dict()["value"]} for name, m in result.metrics.items()},
        "sums": {
            "d_in": sums.d_in,
            "scalars": {name: values.tolist() for name, values in sums.scalars.items()},
            "fired": sums.fired.tolist(),
        },
    }


def sums_from_entry(entry: dict[str, Any], where: str) -> SequenceSums:
    """The entry's per-sequence sums (inline lists or arrays from the sidecar)."""
    try:
        stored = entry["sums"]
        scalars = {name: np.asarray(values, dtype=np.float64) for name, values in stored["scalars"].items()}
        fired = np.asarray(stored["fired"], dtype=np.int64)
        d_in = int(stored["d_in"])
    except (KeyError, TypeError, ValueError) as err:
        raise BaselineError(f"{where}: malformed per-sequence sums (missing or bad {err}); {REFRESH}") from None
    # The activation vector sums are not stored ([n_seq, d_in] each): r2 is never gated,
    # so never regressed on, and comes back NaN from a baseline.
    return SequenceSums(scalars=scalars, fired=fired, d_in=d_in)


def sidecar_path(path: Path) -> Path:
    """The binary sidecar of the baseline JSON at `path`: same folder and stem, `.npz`."""
    return path.with_suffix(".npz")


@dataclass(frozen=True)
class Baseline:
    """A read baseline: where it is (for messages) and its per-SAE entries, sums inline."""

    path: Path
    saes: dict[str, Any]


def load_baseline(path: Path) -> Baseline:
    """Read and check a baseline (format 2 or 3); a corrupt or foreign file is one clear error."""
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"{path}: no such baseline (write one with --sae-update-baseline)")
    try:
        payload = read_json(path, "a sae-acceptance baseline")
    except OutputError as err:
        raise BaselineError(str(err)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BaselineError(f'{path}: not a sae-acceptance baseline (no "format": "{FORMAT}")')
    version = payload.get("version")
    if version not in READ_VERSIONS:
        raise BaselineError(
            f"{path}: baseline format version {version}, this version reads "
            f"{' and '.join(map(str, READ_VERSIONS))}; {REFRESH}=force"
        )
    saes = payload.get("saes")
    if not isinstance(saes, dict) or not all(isinstance(e, dict) for e in saes.values()):
        raise BaselineError(f'{path}: no "saes" table')
    if version == 3:
        saes = _with_matching_sidecar(path, saes)
    return Baseline(path, saes)


def baseline_entries(report: EvalReport) -> dict[str, Any]:
    """The baseline entries of a report's measured SAEs (under their names) and splices (under
    `splice:<name>`); an entry with an error has none."""
    measured = [*report.saes.items(), *((splice_key(name), r) for name, r in report.splices.items())]
    return {
        key: entry_for(result, report.settings)
        for key, result in measured
        if result.error is None and result.sums is not None
    }


def update_baseline(path: Path, entries: dict[str, Any], force: bool = False) -> Path:
    """Fold `entries` into the baseline at `path` and write it (format 3) atomically, under a lock.

    Other SAEs' entries are kept; an SAE whose numbers did not move (`UNCHANGED_RTOL`)
    keeps its stored entry byte for byte. An existing file that cannot be read (corrupt,
    foreign, an unknown version, a sidecar that does not match) is an error unless `force`,
    which replaces it.
    """
    path = Path(path)
    with locked(path):
        saes: dict[str, Any] = {}
        if path.exists():
            try:
                saes = load_baseline(path).saes
            except BaselineError as err:
                if not force:
                    raise BaselineError(f"{err} (not overwritten: --sae-update-baseline=force replaces it)") from None
        for name, entry in entries.items():
            if name not in saes or _moved(saes[name], entry):
                saes[name] = entry
        written = write_baseline(path, saes)
    remove_lock(path)
    return written


def write_baseline(path: Path, entries: dict[str, Any]) -> Path:
    """Write exactly `entries` as a format-3 baseline: the sidecar first, then the JSON that
    names it (each atomic; the JSON holds each SAE's digest, so a torn pair is detected)."""
    path = Path(path)
    sidecar = sidecar_path(path)
    blocks, arrays = {}, {}
    for name in sorted(entries):
        entry = entries[name]
        sums = sums_from_entry(entry, f"{path}: {name}")
        own = _arrays(sums)
        arrays.update(_members(name, own))
        meta = {
            "d_in": sums.d_in,
            "n_sequences": sums.n_sequences,
            "d_sae": int(sums.fired.size),
            "sha256": _digest(own),
        }
        blocks[name] = {"fingerprint": entry.get("fingerprint", {}), "metrics": entry.get("metrics", {}), "sums": meta}
    # The two files cannot be replaced in one step: the previous sidecar is kept until the JSON
    # is, so a write cut between them leaves the old JSON with sums it can read.
    previous = previous_sidecar(path)
    if sidecar.exists():
        write_atomic(previous, sidecar.read_bytes())
    write_atomic(sidecar, _npz_bytes(arrays))
    written = write_atomic(
        path, _render({"format": FORMAT, "version": FORMAT_VERSION, "sidecar": sidecar.name}, blocks)
    )
    previous.unlink(missing_ok=True)
    return written


def previous_sidecar(path: Path) -> Path:
    """The sidecar of the last complete write, while a new one is being written."""
    return path.with_suffix(".prev.npz")


def _with_matching_sidecar(path: Path, saes: dict[str, Any]) -> dict[str, Any]:
    """The sums from the sidecar, or from the previous one where a write stopped between the
    sidecar and the JSON (the JSON is then still the previous write's)."""
    try:
        return _with_sidecar_sums(path, saes)
    except BaselineError as err:
        first = err
    previous = previous_sidecar(path)
    if previous.exists():
        try:
            return _with_sidecar_sums(path, saes, previous)
        except BaselineError:
            pass
    raise first


def _arrays(sums: SequenceSums) -> dict[str, np.ndarray]:
    """An SAE's stored arrays in their canonical dtypes (float64 sums, int64 counts)."""
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
    return np.ascontiguousarray(
        values.astype(values.dtype.newbyteorder("<")).view(np.uint8).reshape(-1, values.itemsize).T
    )


def _unplanes(planes: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(planes.T).view(np.dtype(f"<{kind}{planes.shape[0]}")).ravel()


def _members(name: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An SAE's sidecar members: its sum names, its sums ([n_sums, n_seq] float64) and its
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


def _with_sidecar_sums(path: Path, saes: dict[str, Any], sidecar: Path | None = None) -> dict[str, Any]:
    """Format 3's entries with their sums read back from the sidecar (and checked against the JSON)."""
    sidecar = sidecar or sidecar_path(path)
    try:
        with np.load(sidecar, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise BaselineError(f"{sidecar}: missing (the sums of {path}); {REFRESH}=force") from None
    except Exception as err:  # zipfile, numpy and OS errors alike: the file is not a readable .npz
        raise BaselineError(
            f"{sidecar}: corrupt baseline sidecar ({type(err).__name__}: {err}); {REFRESH}=force"
        ) from None
    out = {}
    for name, entry in saes.items():
        meta = entry.get("sums")
        try:
            names = [str(n) for n in stored[f"{name}{SEP}names"]]
            table = _unplanes(stored[f"{name}{SEP}sums"], "f").reshape(len(names), -1)
            arrays = {f"scalars.{n}": row for n, row in zip(names, table, strict=True)}
            arrays["fired"] = _unplanes(stored[f"{name}{SEP}fired"], "u").astype(np.int64)
        except (KeyError, ValueError, TypeError) as err:
            raise BaselineError(f"{sidecar}: no readable sums for {name} ({err}); {REFRESH}=force") from None
        if not isinstance(meta, dict) or _digest(arrays) != meta.get("sha256"):
            raise BaselineError(
                f"{sidecar}: the sums of {name} do not match {path.name} (the two files come from different writes); "
                f"{REFRESH}=force"
            )
        scalars = {n: arrays[f"scalars.{n}"] for n in names}
        out[name] = {**entry, "sums": {"d_in": meta.get("d_in"), "scalars": scalars, "fired": arrays["fired"]}}
    return out


def _moved(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a refresh changes an SAE: another fingerprint (the project's version aside),
    or a metric value beyond `UNCHANGED_RTOL`."""

    def identity(entry):
        return {k: v for k, v in entry.get("fingerprint", {}).items() if k != "project_version"}

    if identity(old) != identity(new) or set(old.get("metrics", {})) != set(new.get("metrics", {})):
        return True
    for name, metric in new["metrics"].items():
        a, b = old["metrics"][name].get("value"), metric.get("value")
        if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=UNCHANGED_RTOL)):
            return True
    return False


def _render(head: dict[str, Any], blocks: dict[str, Any]) -> str:
    """Pretty JSON a diff reads SAE by SAE: one block per SAE, its fingerprint on one line,
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


@dataclass(frozen=True)
class RegressionCheck:
    metric: str
    passed: bool
    skipped: bool
    message: str
    change: float = math.nan
    ci: tuple[float, float] | None = None


def compare_sae(
    baseline: Baseline,
    result: SAEResult,
    settings: dict[str, Any],
    tolerances: dict[str, float | None],
    strict: bool = False,
) -> dict[str, RegressionCheck]:
    """Each metric of `tolerances` (None: its default tolerance) against the baseline.

    A metric fails when it is worse than the baseline by more than its tolerance,
    with the whole paired interval of the change beyond the tolerance. One paired
    bootstrap serves every metric of the SAE.
    """
    where = str(baseline.path)
    entry = baseline.saes.get(result.name)
    if entry is None:
        message = f"{result.name}: no baseline entry in {where} (a new SAE)"
        return {m: RegressionCheck(m, not strict, not strict, message) for m in tolerances}
    _check_identity(entry.get("fingerprint", {}), run_identity(result, settings), result.name, where)
    if not isinstance(entry.get("metrics"), dict):
        raise BaselineError(f'{where}: {result.name} has no "metrics" table; refresh with --sae-update-baseline')
    for metric in tolerances:
        if METRICS[metric].higher_is_better is None:
            raise BaselineError(f"{metric}: has no direction, cannot be regressed on")
    bootstrap = BootstrapSettings.from_report(settings)
    paired = {}
    if any(METRICS[m].has_ci for m in tolerances):
        paired = paired_changes(result.sums, sums_from_entry(entry, where), bootstrap)
    checks = {}
    for metric, tolerance in tolerances.items():
        before = entry["metrics"].get(metric, {}).get("value")
        if before is None:  # absent, or not finite when the baseline was written (JSON null)
            message = f"{where}: {result.name} has no value for {metric}; refresh with --sae-update-baseline"
            checks[metric] = RegressionCheck(metric, False, False, message)
            continue
        checks[metric] = _check(
            metric,
            before,
            result.metrics[metric].value,
            paired.get(metric),
            bootstrap.confidence,
            METRICS[metric].tolerance if tolerance is None else tolerance,
        )
    return checks


def _check(metric: str, before: float, after: float, paired, confidence: float, tolerance: float) -> RegressionCheck:
    """One metric's verdict from its values and, where it has an interval, its paired change."""
    spec = METRICS[metric]
    sign = 1.0 if spec.higher_is_better else -1.0
    if spec.has_ci:
        change, ci = paired.change, paired.ci
        worse_low = min(-sign * ci[0], -sign * ci[1])
        interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}] (paired {int(100 * confidence)}% CI)"
    else:
        change, ci = after - before, None
        worse_low = -sign * change
        interval = ""
    worse = -sign * change
    regressed = worse > tolerance and worse_low > tolerance
    if not math.isfinite(change) or (ci is not None and not all(map(math.isfinite, ci))):
        return RegressionCheck(metric, False, False, f"{metric}: the change is not finite", change, ci)
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    message = (
        f"{metric} {before:.4f} -> {after:.4f}: change {change:+.4f}{interval}, tolerance {tolerance:g} ({direction})"
    )
    if regressed:
        message = f"regression: {message}"
    return RegressionCheck(metric, not regressed, False, message, change, ci)


def _check_identity(stored: dict[str, Any], current: dict[str, Any], name: str, where: str) -> None:
    differs = [key for key in MUST_MATCH if stored.get(key) != current.get(key)]
    if differs:
        detail = "; ".join(f"{k}: baseline {stored.get(k)!r}, now {current.get(k)!r}" for k in differs)
        raise BaselineError(
            f"{where}: {name} was measured on something else ({detail}); refresh with --sae-update-baseline"
        )
