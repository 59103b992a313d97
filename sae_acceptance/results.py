"""What a gate produced: one `EntryResult` per entry of a thresholds file, gathered in an `EvalReport`.

An entry is an `[[sae]]` (`SAEResult`), a `[[splice]]` (`SpliceResult`) or a
`[[clt]]` (`CLTResult`, a splice's fields plus its layers); all share the
fields, the decisions and the JSON form of `EntryResult`, and add only their
own fields. Plain data: every decision they expose comes from `verdict`.
`to_dict` is the JSON report's form; `from_dict` reads it back (unknown keys
from a newer version are ignored), so a merged or re-read report decides and
prints exactly as the run that wrote it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from sae_acceptance.config import clt_key, splice_key
from sae_acceptance.geometry import LayerGeometry
from sae_acceptance.io import to_json
from sae_acceptance.metrics import latent_densities
from sae_acceptance.stats import SequenceSums
from sae_acceptance.verdict import (
    EntryStatus,
    MetricValue,
    Outcome,
    RegressionCheck,
    Verdict,
    entry_status,
    outcome,
)


@dataclass
class Latents:
    """Per-latent statistics: firing counts over the counted tokens (what densities and histograms
    read), the sequences each latent fired in, and the weight statistics of `weights.latent_weights`."""

    fired: np.ndarray  # [d_sae] int64: tokens each latent fired on
    n_tokens: float  # counted tokens
    fired_sequences: np.ndarray | None = None  # [d_sae] int64: sequences each latent fired in
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # per-latent weight statistics, [d_sae] each

    def arrays(self) -> dict[str, np.ndarray]:
        """Every per-latent array by name (what the densities file holds beside `density`)."""
        out = {"fired": self.fired.astype(np.int64), **self.weights}
        if self.fired_sequences is not None:
            out["fired_sequences"] = self.fired_sequences.astype(np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], n_tokens: float) -> Latents:
        """Back from `arrays` (a densities file, or a worker's wire form)."""
        known = ("fired", "fired_sequences", "density", "n_tokens", "dense_threshold")
        weights = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if k not in known}
        sequences = arrays.get("fired_sequences")
        return cls(
            np.asarray(arrays["fired"], dtype=np.int64),
            float(n_tokens),
            None if sequences is None else np.asarray(sequences, dtype=np.int64),
            weights,
        )

    @property
    def density(self) -> np.ndarray:
        """Each latent's share of counted tokens (NaN where nothing was counted)."""
        return latent_densities(self.fired, self.n_tokens)


Entry = TypeVar("Entry", bound="EntryResult")


@dataclass(frozen=True)
class Source:
    """Where an entry is declared: its thresholds file (as the workspace names it) and line."""

    file: str
    line: int

    def to_dict(self) -> dict[str, Any]:
        """The location as JSON."""
        return {"file": self.file, "line": self.line}


@dataclass
class EntryResult:
    """Everything measured and decided about one entry; the fields every kind of entry shares."""

    name: str
    model: str | None = None
    hook: str | None = None
    tokens_fingerprint: str | None = None
    excluded_ids: list[int] | None = None
    error: str | None = None
    expect_fail: list[str] = field(default_factory=list)
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    regressions: dict[str, RegressionCheck] = field(default_factory=dict)
    baseline_error: str | None = None  # the entry could not be compared with its baseline at all
    source: Source | None = None
    sums: SequenceSums | None = None

    kind: ClassVar[str] = "entry"
    # Fields written before the shared ones in the JSON form, and after them.
    head: ClassVar[tuple[str, ...]] = ()
    tail: ClassVar[tuple[str, ...]] = ()

    @property
    def key(self) -> str:
        """The entry's name among all entries of a file: its pytest node and its baseline entry."""
        return self.name

    @property
    def label(self) -> str:
        """How messages name the entry."""
        return self.name

    def outcome(self, metric: str) -> Outcome:
        """The gated `metric`'s outcome: the one place a negative control is read."""
        return outcome(self.verdicts[metric], metric in self.expect_fail)

    def as_expected(self, metric: str) -> bool:
        """Whether `metric`'s check came out as the entry expects (passed, or failed for a control)."""
        return self.outcome(metric).as_expected

    @property
    def status(self) -> EntryStatus:
        """The entry's verdict: error, a failed gate, a regression, a caught control, or passed."""
        outcomes = [self.outcome(m) for m in self.verdicts]
        error = self.error or self.baseline_error
        return entry_status(error, outcomes, self.regressions.values(), bool(self.expect_fail))

    @property
    def passed(self) -> bool:
        """Evaluated, and every gated item as expected (regressions are the gate's, not the entry's)."""
        return self.error is None and all(self.as_expected(m) for m in self.verdicts)

    def to_dict(self, sums: bool = False) -> dict[str, Any]:
        """The JSON report's form of this entry; with `sums`, also its per-sequence sums (how a
        pytest-xdist worker hands its results to the controller)."""
        out = {name: _plain(getattr(self, name)) for name in self.head}
        out.update(
            tokens_fingerprint=self.tokens_fingerprint,
            excluded_ids=self.excluded_ids,
            error=self.error,
            expect_fail=self.expect_fail,
            metrics={name: m.to_dict() for name, m in self.metrics.items()},
            verdicts={name: v.to_dict() for name, v in self.verdicts.items()},
        )
        out.update({name: _plain(getattr(self, name)) for name in self.tail})
        if self.regressions or self.baseline_error:
            out["regressions"] = {name: c.to_dict() for name, c in self.regressions.items()}
            out["baseline_error"] = self.baseline_error
        if self.source is not None:
            out["source"] = self.source.to_dict()
        if sums and self.sums is not None:
            out["sums"] = {
                "d_in": self.sums.d_in,
                "scalars": {k: v.tolist() for k, v in self.sums.scalars.items()},
                "fired": self.sums.fired.tolist(),
            }
        return out

    @classmethod
    def from_dict(cls: type[Entry], name: str, data: Mapping[str, Any]) -> Entry:
        """Back from `to_dict` (no sums); keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)} - {"name", "metrics", "verdicts", "regressions", "sums"}
        fields = {key: data[key] for key in known if data.get(key) is not None}
        if "source" in fields:
            fields["source"] = Source(str(fields["source"]["file"]), int(fields["source"]["line"]))
        stored = data.get("sums")
        sums = None
        if stored is not None:
            scalars = {k: np.asarray(v, dtype=np.float64) for k, v in stored["scalars"].items()}
            sums = SequenceSums(scalars, np.asarray(stored["fired"], dtype=np.int64), int(stored["d_in"]))
        return cls(
            name=name,
            **cls._read_own(fields),
            metrics={m: MetricValue.from_dict(v) for m, v in (data.get("metrics") or {}).items()},
            verdicts={m: Verdict.from_dict(v) for m, v in (data.get("verdicts") or {}).items()},
            regressions={m: RegressionCheck.from_dict(v) for m, v in (data.get("regressions") or {}).items()},
            sums=sums,
        )

    @classmethod
    def _read_own(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """A kind's own structured fields from JSON (the rest are plain values)."""
        return fields


@dataclass
class SAEResult(EntryResult):
    """An `[[sae]]`: its SAE, the layer's geometry and the R² warning beside the shared fields."""

    path: str = ""
    layer: int | None = None
    architecture: str | None = None
    d_in: int | None = None
    d_sae: int | None = None
    k: int | None = None
    geometry: LayerGeometry | None = None
    r2_warning: str | None = None
    worst_contexts: list[dict[str, Any]] = field(default_factory=list)  # `diagnostics.WorstContexts.records`
    propagation: list[dict[str, Any]] = field(default_factory=list)  # {"layer", "ratio"} per later block
    latents: Latents | None = None

    kind: ClassVar[str] = "sae"
    head: ClassVar[tuple[str, ...]] = ("model", "hook", "layer", "path", "architecture", "d_in", "d_sae", "k")
    tail: ClassVar[tuple[str, ...]] = ("geometry", "r2_warning", "worst_contexts", "propagation")

    def __post_init__(self) -> None:
        if self.latents is None and self.sums is not None and self.sums.fired.size:
            self.latents = Latents(self.sums.fired, float(self.sums.scalars["n_tokens"].sum()))

    def to_dict(self, sums: bool = False) -> dict[str, Any]:
        out = super().to_dict(sums)
        if sums and self.latents is not None:
            arrays = {name: values.tolist() for name, values in self.latents.arrays().items()}
            out["latents"] = {"n_tokens": self.latents.n_tokens, **arrays}
        return out

    @classmethod
    def _read_own(cls, fields: dict[str, Any]) -> dict[str, Any]:
        stored = fields.pop("latents", None)
        if stored is not None:
            fields["latents"] = Latents.from_arrays(stored, stored["n_tokens"])
        if "geometry" in fields:
            fields["geometry"] = LayerGeometry.from_dict(fields["geometry"])
        return fields


@dataclass
class SpliceResult(EntryResult):
    """A `[[splice]]` group: its SAEs patched in together, the joint loss measured and gated.
    `hook` joins the members' hooks (what a baseline entry records as the place measured)."""

    saes: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)

    kind: ClassVar[str] = "splice"
    head: ClassVar[tuple[str, ...]] = ("saes", "hooks", "model")

    def __post_init__(self) -> None:
        if self.hook is None and self.hooks:
            self.hook = " + ".join(self.hooks)

    @property
    def key(self) -> str:
        """`<kind>:<name>` (`splice:` or `clt:`), apart from any SAE's name."""
        return clt_key(self.name) if self.kind == "clt" else splice_key(self.name)

    @property
    def label(self) -> str:
        """`splice <name>` or `clt <name>`."""
        return f"{self.kind} {self.name}"


@dataclass
class CLTResult(SpliceResult):
    """A `[[clt]]`: a cross-layer transcoder's replacement model, its joint loss measured and gated
    as a splice's; `layers` holds, per layer, the reconstruction of the MLP output inside the
    replacement forward (`nmse`, `cosine`, `l0`) and the layer's hooks."""

    path: str = ""
    clt_kind: str | None = None  # circuit-tracer's model_kind
    layers: list[dict[str, Any]] = field(default_factory=list)

    kind: ClassVar[str] = "clt"
    head: ClassVar[tuple[str, ...]] = ("path", "clt_kind", "hooks", "model")
    tail: ClassVar[tuple[str, ...]] = ("layers",)


@dataclass(frozen=True)
class ShardRecord:
    """What a shard's report says of itself, so `merge` can tell a missing, partial or foreign
    shard: its index and count, its members, the run it belongs to (`run`: `--run-id`, else the
    CI system's run id) and a fingerprint of what it ran on (`shard.run_fingerprint`)."""

    index: int
    count: int
    saes: list[str]
    run: str | None = None
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ShardRecord:
        """Back from `to_dict`, checked before anything is sized from it (a ValueError says what
        is wrong)."""
        if not isinstance(data, Mapping):
            raise ValueError('"shard" is not an object')
        index, count, saes = data.get("index"), data.get("count"), data.get("saes")
        if (
            not (isinstance(index, int) and isinstance(count, int))
            or isinstance(index, bool)
            or isinstance(count, bool)
        ):
            raise ValueError(f'"shard": index and count must be whole numbers, got {index!r} and {count!r}')
        if not 1 <= index <= count:
            raise ValueError(f'"shard": expected 1 <= index <= count, got {index}/{count}')
        if not isinstance(saes, list) or not all(isinstance(s, str) for s in saes):
            raise ValueError('"shard": "saes" must be a list of names')
        run, fingerprint = data.get("run"), data.get("fingerprint")
        return cls(
            index, count, saes, None if run is None else str(run), None if fingerprint is None else str(fingerprint)
        )


@dataclass
class EvalReport:
    """A gate's whole outcome: the eval settings, timing, and every entry's result."""

    settings: dict[str, Any]
    timing: dict[str, Any]
    saes: dict[str, SAEResult]
    splices: dict[str, SpliceResult] = field(default_factory=dict)
    shard: ShardRecord | None = None
    clts: dict[str, CLTResult] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> EvalReport:
        """The report of a shard with nothing to evaluate."""
        return cls(settings={}, timing={}, saes={})

    @property
    def entries(self) -> list[EntryResult]:
        """Every SAE's result, then every splice's, then every CLT's."""
        return [*self.saes.values(), *self.splices.values(), *self.clts.values()]

    def __iter__(self) -> Iterator[EntryResult]:
        return iter(self.entries)

    @property
    def passed(self) -> bool:
        """Whether every entry came out as expected."""
        return all(r.passed for r in self.entries)

    def to_dict(self, sums: bool = False) -> dict[str, Any]:
        """The JSON report (with `sums`: and every entry's per-sequence sums)."""
        out = {
            "eval": self.settings,
            "timing": self.timing,
            "saes": {name: r.to_dict(sums) for name, r in self.saes.items()},
            "splices": {name: r.to_dict(sums) for name, r in self.splices.items()},
        }
        if self.clts:  # absent when there are none: reports without CLTs read as before
            out["clts"] = {name: r.to_dict(sums) for name, r in self.clts.items()}
        if self.shard is not None:
            out["shard"] = self.shard.to_dict()
        return out

    def to_json(self) -> str:
        """The JSON report's text (no sums)."""
        return to_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        """A report back from its JSON (no sums): tables, verdicts and exit status as the run's."""
        shard = data.get("shard")
        return cls(
            settings=dict(data.get("eval") or {}),
            timing=dict(data.get("timing") or {}),
            saes={name: SAEResult.from_dict(name, r) for name, r in (data.get("saes") or {}).items()},
            splices={name: SpliceResult.from_dict(name, r) for name, r in (data.get("splices") or {}).items()},
            shard=None if shard is None else ShardRecord.from_dict(shard),
            clts={name: CLTResult.from_dict(name, r) for name, r in (data.get("clts") or {}).items()},
        )


def _plain(value: Any) -> Any:
    """A field's JSON form: objects with `to_dict` through it, the rest as they are."""
    return value.to_dict() if hasattr(value, "to_dict") else value


REPORT_KEYS = ("eval", "timing", "saes", "splices", "clts", "shard")


def unknown_fields(data: Mapping[str, Any]) -> list[str]:
    """Keys of a JSON report this version does not read (a newer version wrote it): `from_dict`
    ignores them, and a reader says so."""
    found = [key for key in data if key not in REPORT_KEYS]
    for section, kind in (("saes", SAEResult), ("splices", SpliceResult), ("clts", CLTResult)):
        known = {f.name for f in dataclasses.fields(kind)} | set(kind.head) | set(kind.tail)
        known |= {"regressions", "baseline_error", "source", "sums"}
        for name, entry in (data.get(section) or {}).items():
            if isinstance(entry, Mapping):
                found += [f"{section}.{name}.{key}" for key in entry if key not in known]
    return found
