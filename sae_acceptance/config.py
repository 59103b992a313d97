"""thresholds.toml: schema and validation.

The whole file is validated before anything runs; the first problem becomes one
`ConfigError` naming the file, the line and the field, and what was expected.
Relative paths are relative to the file's own directory.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sae_acceptance.errors import ConfigError, SAEFormatError
from sae_acceptance.io import read_text, write_atomic
from sae_acceptance.metrics import METRICS, R2_REFUSAL, SPLICE_METRICS, VARIANCE_NORMALISED
from sae_acceptance.sources.spec import SAELENS_PREFIX, check_spec, default_name, is_remote, parse_saelens_release
from sae_acceptance.stats import BootstrapSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEMA_FILE = "thresholds.schema.json"


class StrictModel(BaseModel):
    """Settings: unknown keys are errors, values frozen once validated. A field's docstring is its
    description (the JSON schema's and the CLI's help)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Bound(StrictModel):
    """`min`/`max` on a metric, checked on the point estimate or on an interval end."""

    min: float | None = None
    """the lowest passing value"""
    max: float | None = None
    """the highest passing value"""
    on: Literal["point", "ci_low", "ci_high"] = "point"
    """what is checked: the point estimate, or the low or high end of its interval"""

    @model_validator(mode="after")
    def _one_side_at_least(self) -> Bound:
        for side in ("min", "max"):
            value = getattr(self, side)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{side} must be a finite number, not {value}")
        if self.min is None and self.max is None:
            raise ValueError("a bound needs `min` or `max`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


def _check_gate(gate: dict[str, Bound]) -> dict[str, Bound]:
    """Metric-level checks; messages start with `<metric>:` so errors can point at its line."""
    for name, bound in gate.items():
        if name in VARIANCE_NORMALISED:
            raise ValueError(f"{name}: {name} {R2_REFUSAL}")
        spec = METRICS.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, gateable_metrics(), n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "gateable metrics: docs/metrics.md"
            raise ValueError(f"{name}: unknown metric ({hint})")
        if not spec.gateable:
            raise ValueError(f"{name}: cannot be gated")
        if bound.on != "point" and not spec.has_ci:
            raise ValueError(f'{name}: has no interval; use on = "point"')
        for side in ("min", "max"):
            value = getattr(bound, side)
            if value is not None and not spec.lo <= value <= spec.hi:
                raise ValueError(f"{name}: {side} = {value} is outside the range [{spec.lo}, {spec.hi}]")
    return gate


Gate = Annotated[dict[str, Bound], AfterValidator(_check_gate), Field(default_factory=dict)]


DType = Literal["float32", "float16", "bfloat16"]
DiagnosticPart = Literal["random", "gradient", "worst", "propagation", "saebench"]
DIAGNOSTIC_PARTS: tuple[str, ...] = get_args(DiagnosticPart)
BackendName = Literal["auto", "transformer_lens", "hf"]
BACKENDS: tuple[str, ...] = get_args(BackendName)  # `auto` first: the rest are the libraries that run a model


class EvalSettings(StrictModel):
    """`[eval]`: the eval set and how it runs. These defaults are the CLI's too."""

    data: str = Field(description="a .npy token file, a local dataset directory, or a hub dataset name")
    model: str | None = Field(None, description="default model for every [[sae]] (hub name or local dir)")
    n_sequences: int = Field(200, gt=0, description="sequences in the eval set")
    context_size: int = Field(256, gt=1, description="tokens per sequence")
    skip: int = Field(0, ge=0, description="sequences skipped first (held out from training data)")
    column: str | None = Field(None, description="dataset column: tokens, input_ids or text")
    split: str = Field("train", description="dataset split")
    batch_size: int = Field(8, gt=0, description="sequences per forward pass")
    bootstrap_resamples: int = Field(5000, ge=100, description="percentile-bootstrap resamples over sequences")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of every interval")
    seed: int = Field(0, ge=0, description="bootstrap seed")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N or mps")
    devices: int | list[str] | None = Field(
        None, description='place the model across GPUs: a count, or a list such as ["cuda:0", "cuda:1"]'
    )
    dtype: DType = Field("float32", description="the model's dtype (sums stay float64)")
    sae_dtype: DType | None = Field(
        None, description="the SAEs' dtype (default: each SAE's own; float32 for sae-lens:// releases)"
    )
    backend: BackendName = Field(
        "auto", description="how the model runs: TransformerLens where it can load it, else Hugging Face"
    )
    exclude_special_tokens: bool | list[int] = Field(
        True, description="true: the tokenizer's BOS/EOS/PAD; false: none; a list: these ids"
    )
    dense_threshold: float = Field(
        0.1, gt=0, lt=1, description="dense_frac counts latents firing on more than this share of counted tokens"
    )
    diagnostics: bool | list[DiagnosticPart] = Field(
        True,
        description="why an SAE fails: true (every part), false, or the parts to run: "
        "random (error against a random direction), gradient (the loss gradient at the hook), "
        "worst (the contexts hurt most), propagation (the error through later blocks), saebench (SAEBench's core)",
    )
    worst_n: int = Field(16, ge=0, description="worst contexts kept per SAE (the diagnostics' `worst` part)")

    @field_validator("exclude_special_tokens")
    @classmethod
    def _token_ids(cls, ids: bool | list[int]) -> bool | list[int]:
        """Token ids are int64 tensors' entries: an id outside [0, 2**63) is no token."""
        outside = [i for i in ids if not 0 <= i < 2**63] if isinstance(ids, list) else []
        if outside:
            raise ValueError(f"token id {outside[0]} is not a token id (0 to 2**63 - 1)")
        return ids

    def parts(self) -> tuple[str, ...]:
        """The diagnostic parts this eval runs."""
        if self.diagnostics is True:
            return DIAGNOSTIC_PARTS
        return tuple(self.diagnostics) if self.diagnostics else ()

    @property
    def bootstrap(self) -> BootstrapSettings:
        """How every interval of this eval is drawn."""
        return BootstrapSettings(self.bootstrap_resamples, self.confidence, self.seed)


def eval_default(name: str) -> Any:
    """An `[eval]` setting's default, for code that runs outside a thresholds file (sweeps, training)."""
    return EvalSettings.model_fields[name].default


class CanyonSettings(StrictModel):
    """`[canyon]`: when a layer's PR flags it, and R² there becomes a warning.

    At the default 0.02, pythia-70m's block 3 and pythia-410m's blocks 5 and 12 are
    flagged, their blocks 1 and 4 are not. PR >= 1 always, so pr_ratio >= 1/d_model:
    below d_model = 1/threshold (50 by default) no layer can be flagged.
    """

    threshold: float = Field(0.02, gt=0, lt=1, description="flag a layer when pr_ratio is below this")
    use: Literal["raw", "deflated"] = Field("raw", description="raw PR, or PR with the top eigenvalue removed")

    def flags(self, pr_ratio_raw: float, pr_ratio_deflated: float) -> bool:
        """True when the chosen ratio is below the threshold (NaN is never flagged)."""
        value = pr_ratio_raw if self.use == "raw" else pr_ratio_deflated
        return bool(value < self.threshold)


class Tolerance(StrictModel):
    """`[regression] <metric>`: how much worse than the baseline a metric may get and still pass."""

    tolerance: float = Field(ge=0, description="allowed worsening, in the metric's units")


class SAEEntry(StrictModel):
    """`[[sae]]`: one SAE to gate, where to find it, and what to patch it into."""

    path: str = Field(
        description="SAE directory relative to this file, hf://owner/repo[@revision]/folder, or sae-lens://release/sae_id"
    )
    name: str | None = None
    """the entry's name in item ids and reports (default: the SAE's directory or hub folder name)"""
    model: str | None = None
    """the model to patch, hub name or local dir (default: [eval] model, else the SAE's cfg.json's)"""
    hook: str | None = Field(None, description="hookpoint the SAE reads (default: its cfg.json's)")
    hook_out: str | None = Field(
        None,
        description="a transcoder's output hook, where its output replaces the activation (default: its cfg.json's)",
    )
    gate: Gate
    """this SAE's own bounds, overriding [gate]'s metric by metric"""
    expect_fail: list[str] = Field(
        default_factory=list,
        description="negative control: these gated metrics must fail (xfail when they do, fail when they pass)",
    )

    @field_validator("path")
    @classmethod
    def _hub_name_well_formed(cls, path: str) -> str:
        """A hub name's syntax is checked here; fetching waits for the eval."""
        try:
            check_spec(path)
        except SAEFormatError as err:
            raise ValueError(str(err)) from None
        return path

    @field_validator("name")
    @classmethod
    def _node_safe(cls, name: str | None) -> str | None:
        return None if name is None else node_safe(name)

    @property
    def display_name(self) -> str:
        """The SAE's name: `name`, else its directory's (or hub folder's) name."""
        if self.name:
            return self.name
        return default_name(self.path) if is_remote(self.path) else Path(self.path).name

    @property
    def key(self) -> str:
        """Its name among the file's entries: its pytest node and baseline entry."""
        return self.display_name


def node_safe(name: str) -> str:
    """A name that can be a pytest node (`thresholds.toml::<name>::<metric>`) and a file name."""
    if not name or "::" in name or "/" in name:
        raise ValueError(f"name {name!r} must be non-empty and contain no '::' or '/'")
    return name


def _check_splice_gate(gate: dict[str, Bound]) -> dict[str, Bound]:
    for name in gate:
        if name in METRICS and name not in SPLICE_METRICS:
            raise ValueError(f"{name}: a splice or CLT gates its joint loss only ({', '.join(SPLICE_METRICS)})")
    return gate


def splice_key(name: str) -> str:
    """`splice:<name>`: a splice's node name and baseline entry, apart from the SAEs' names."""
    return f"splice:{name}"


class _JointEntry(StrictModel):
    """What a splice and a CLT share: a name that is a pytest node, bounds on the joint metrics
    of one replacement, and negative controls."""

    name: str
    """the entry's name: its pytest node and baseline entry, after its kind (`splice:`, `clt:`)"""
    gate: Annotated[Gate, AfterValidator(_check_splice_gate)]
    """the bounds on the joint metrics (no default bounds: a joint entry gates what it names)"""
    expect_fail: list[str] = Field(default_factory=list, description="negative control: these gated metrics must fail")

    @field_validator("name")
    @classmethod
    def _node_safe(cls, name: str) -> str:
        return node_safe(name)


class SpliceEntry(_JointEntry):
    """`[[splice]]`: SAEs of one model at different hooks, patched in together in one forward."""

    name: str = Field(description="the group's name: items are thresholds.toml::splice:<name>::<metric>")
    saes: list[str] = Field(min_length=1, description="names of [[sae]] entries of this file, one per hook")

    @property
    def key(self) -> str:
        """The splice's key in item ids and runs (`splice:<name>`), apart from any SAE's name."""
        return splice_key(self.name)


def clt_key(name: str) -> str:
    """`clt:<name>`: a cross-layer transcoder's node name and baseline entry."""
    return f"clt:{name}"


class CLTEntry(_JointEntry):
    """`[[clt]]`: a cross-layer transcoder (or a set of per-layer transcoders) evaluated as a whole:
    every MLP output it covers replaced at once, its joint loss measured and gated like a splice's."""

    name: str = Field(description="items are thresholds.toml::clt:<name>::<metric>")
    path: str = Field(
        description="circuit-tracer transcoder directory (or its config.yaml) relative to this file, "
        "hf://owner/repo[@revision][/folder], or sae-lens://<release> of a mntss_clt_layer_transcoder release"
    )
    model: str | None = Field(None, description="the model (default: [eval] model, else the config.yaml's model_name)")

    @field_validator("path")
    @classmethod
    def _hub_name_well_formed(cls, path: str) -> str:
        """A hub name's syntax is checked here (a SAELens id names a whole release); fetching waits for the eval."""
        try:
            if path.startswith(SAELENS_PREFIX):
                parse_saelens_release(path)
            else:
                check_spec(path)
        except SAEFormatError as err:
            raise ValueError(str(err)) from None
        return path

    @property
    def key(self) -> str:
        """The CLT's key in item ids and runs (`clt:<name>`), apart from any SAE's or splice's name."""
        return clt_key(self.name)

    @property
    def saes(self) -> list[str]:
        """A CLT has no [[sae]] members: it is one entry."""
        return []


JointEntry = SpliceEntry | CLTEntry


class Thresholds(StrictModel):
    """A whole thresholds file: the eval settings, the bounds, and the entries they apply to."""

    eval: EvalSettings
    """`[eval]`: the model, data and passes every entry is measured with"""
    gate: Gate
    """`[gate]`: the default bounds of every `[[sae]]`"""
    canyon: CanyonSettings = CanyonSettings()
    """`[canyon]`: where the PR canyon turns R² into a warning"""
    regression: dict[str, Tolerance] = Field(default_factory=dict)
    """`[regression]`: per metric, how much worse than the baseline still passes"""
    baseline: str | None = Field(None, description="regression baseline JSON, relative to this file")
    sae: list[SAEEntry] = Field(default_factory=list)
    """`[[sae]]`: the SAEs to gate"""
    splice: list[SpliceEntry] = Field(default_factory=list)
    """`[[splice]]`: SAEs patched in together, gated on the joint metrics"""
    clt: list[CLTEntry] = Field(default_factory=list)
    """`[[clt]]`: cross-layer transcoders, each gated on its whole replacement's joint metrics"""

    @field_validator("regression")
    @classmethod
    def _known_metrics(cls, tolerances: dict[str, Tolerance]) -> dict[str, Tolerance]:
        for name in tolerances:
            if name not in METRICS or METRICS[name].higher_is_better is None:
                raise ValueError(f"no regression direction for {name!r}")
        return tolerances

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> Thresholds:
        if not self.sae and not self.clt:
            raise ValueError("sae: at least one [[sae]] (or [[clt]]) entry is required")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Thresholds:
        seen: set[str] = set()
        for entry in self.sae:
            if entry.display_name in seen:
                raise ValueError(f"two [[sae]] entries are named {entry.display_name!r}; give one a `name`")
            seen.add(entry.display_name)
        return self

    @model_validator(mode="after")
    def _controls_are_gated(self) -> Thresholds:
        for i, entry in enumerate(self.sae):
            missing = [m for m in entry.expect_fail if m not in self.gate_for(entry)]
            if missing:
                raise ValueError(f"sae.{i}.expect_fail names metrics without a bound: {', '.join(missing)}")
        return self

    def gate_for(self, entry: SAEEntry | JointEntry) -> dict[str, Bound]:
        """The default [gate] bounds, overridden metric by metric by the entry's own; a splice
        or a CLT has its own bounds only."""
        if isinstance(entry, SpliceEntry | CLTEntry):
            return dict(entry.gate)
        return {**self.gate, **entry.gate}

    def regressed_for(self, entry: SAEEntry | JointEntry) -> list[str]:
        """Metrics compared against a baseline: the gated ones that have a better direction
        (`l0` or `ce_orig` have none), and every metric given a `[regression]` tolerance
        (for a splice, those it measures)."""
        gated = [m for m in self.gate_for(entry) if METRICS[m].higher_is_better is not None]
        extra = [m for m in self.regression if m not in gated]
        if isinstance(entry, SpliceEntry | CLTEntry):
            extra = [m for m in extra if m in SPLICE_METRICS]
        return gated + extra

    @cached_property
    def by_key(self) -> dict[str, SAEEntry | JointEntry]:
        """Every entry by its key: SAEs by name, splices as `splice:<name>`, CLTs as `clt:<name>`."""
        return {**{e.key: e for e in self.sae}, **{s.key: s for s in self.splice}, **{c.key: c for c in self.clt}}

    def splice_members(self, splice: SpliceEntry) -> list[SAEEntry]:
        """The `[[sae]]` entries a splice patches in, in the splice's order."""
        entries = {entry.display_name: entry for entry in self.sae}
        return [entries[name] for name in splice.saes]


def gateable_metrics() -> list[str]:
    """Names of the metrics a bound may be put on."""
    return [name for name, spec in METRICS.items() if spec.gateable]


class LoadedThresholds(BaseModel):
    """A validated file with its location, so paths resolve and errors can point back."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    config: Thresholds
    path: Path
    text: str

    def resolve(self, value: str) -> str:
        """A path relative to the file's directory (`~` expanded); other strings (hub names) as given."""
        candidate = self.path.parent / Path(value).expanduser()
        return str(candidate) if candidate.exists() or _looks_local(value) else value

    def resolve_model(self, name: str) -> str:
        """A model directory relative to the file's directory (`~` expanded); a hub name as given."""
        candidate = self.path.parent / Path(name).expanduser()
        return str(candidate) if candidate.is_dir() or names_local_path(name, self.path.parent) else name

    def baseline_file(self, override: str | Path | None = None) -> Path:
        """The regression baseline: `override` (a command-line path), else `baseline =`
        (relative to this file), else `<stem>.baseline.json` beside it (where an update writes)."""
        if override:
            return Path(override).expanduser().resolve()
        return self.path.parent / Path(self.config.baseline or f"{self.path.stem}.baseline.json").expanduser()

    def compared_baseline(self, override: str | Path | None = None) -> Path | None:
        """The baseline a run compares against: `override` or `baseline =`; none otherwise."""
        return self.baseline_file(override) if override or self.config.baseline else None

    @cached_property
    def lines(self) -> TomlLines:
        """The file's table headers, scanned once for every entry's line."""
        return TomlLines(self.text)

    def place(self, where: str, *loc: str | int) -> str:
        """`where:LINE` of a location, the head of a one-line error (`where` alone without the file's text)."""
        return f"{where}:{self.line_of(*loc)}" if self.text else where

    def line_of(self, *loc: str | int) -> int:
        """The line a location (`"sae", 3, "path"`) is at, for messages that point back."""
        return self.lines.locate(loc)


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".npy", ".json"))


def names_local_path(name: str, base: Path | None = None) -> bool:
    """Whether a model name can only be a local path, so it is never sent to a hub: it starts with
    `.`, `/` or `~`, holds a backslash, more than one `/` or a trailing one, or its first part
    exists in `base` (default: the working directory), as `reference/` does for `reference/modle`."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return True
    first, slash, _ = name.partition("/")
    return bool(slash) and ((base or Path.cwd()) / first).exists()


def load_thresholds(path: str | Path) -> LoadedThresholds:
    """Read and validate a thresholds file, or raise one ConfigError naming file:line and field."""
    path = Path(path)
    raw, text = read_toml(path)
    return _validate(raw, path.resolve(), text, str(path))


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """A TOML file's tables and its text (for line numbers), or one ConfigError."""
    text = read_text(path, "a TOML file", error=ConfigError)
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read as a TOML file; refused") from None


def thresholds_from_mapping(raw: dict[str, Any], source: str, base: Path | None = None) -> LoadedThresholds:
    """The same validation for settings that come from elsewhere (the CLI); paths relative to `base`."""
    return _validate(raw, (base or Path.cwd()).resolve() / f"<{source}>", "", source)


def _validate(raw: dict[str, Any], path: Path, text: str, where: str) -> LoadedThresholds:
    try:
        config = Thresholds.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, text, where)) from None
    loaded = LoadedThresholds(config=config, path=path, text=text)
    _check_paths(loaded, where)
    _check_splices(loaded, where)
    _joint_checks(loaded, where, "clt", loaded.config.clt)
    _check_measured(loaded, where)
    _check_names(loaded, where)
    return loaded


def describe(err: ValidationError, text: str, where: str) -> str:
    """A validation error as one line: ``file:line: field: message (got value)``."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if loc and loc[-1] == "gate" and ": " in message:  # a metric-level gate error
        metric, message = message.split(": ", 1)
        loc += (metric,)
        field = ".".join(str(p) for p in loc)
    shown = first["type"] != "missing" and not isinstance(first["input"], dict)
    given = f" (got {first['input']!r})" if shown else ""
    line = f":{locate(text, loc)}" if text else ""
    return f"{where}{line}: {field}: {message}{given}"


def _check_paths(loaded: LoadedThresholds, where: str) -> None:
    def at(*loc: str | int) -> str:
        return loaded.place(where, *loc)

    for i, entry in enumerate(loaded.config.sae):
        if not is_remote(entry.path) and not Path(loaded.resolve(entry.path)).exists():
            raise ConfigError(f"{at('sae', i, 'path')}: sae.{i}.path: no such SAE directory {entry.path!r}")
    models: list[tuple[tuple[str | int, ...], str | None]] = [(("eval", "model"), loaded.config.eval.model)]
    models += [(("sae", i, "model"), entry.model) for i, entry in enumerate(loaded.config.sae)]
    models += [(("clt", i, "model"), entry.model) for i, entry in enumerate(loaded.config.clt)]
    for loc, model in models:
        if model and names_local_path(model, loaded.path.parent):
            found = Path(loaded.resolve_model(model))
            if not found.is_dir():
                what = "a file, expected a checkpoint directory" if found.exists() else "no such model directory"
                raise ConfigError(f"{at(*loc)}: {'.'.join(map(str, loc))}: {what} {model!r}")
    for i, clt in enumerate(loaded.config.clt):
        if not is_remote(clt.path) and not Path(loaded.resolve(clt.path)).exists():
            raise ConfigError(f"{at('clt', i, 'path')}: clt.{i}.path: no such transcoder directory {clt.path!r}")
    data = loaded.config.eval.data
    if _looks_local(data) and not Path(loaded.resolve(data)).exists():
        raise ConfigError(f"{at('eval', 'data')}: eval.data: no such file or directory {data!r}")


def _check_measured(loaded: LoadedThresholds, where: str) -> None:
    """Every gated metric is measured: one a diagnostic part gives needs that part switched on."""
    config, parts = loaded.config, loaded.config.eval.parts()
    gates = [
        (("gate",), config.gate),
        *((("sae", i, "gate"), e.gate) for i, e in enumerate(config.sae)),
        *((("clt", i, "gate"), e.gate) for i, e in enumerate(config.clt)),
    ]
    for loc, gate in gates:
        for name in gate:
            part = METRICS[name].part
            if part is not None and part not in parts:
                field = ".".join(map(str, (*loc, name)))
                raise ConfigError(
                    f"{loaded.place(where, *loc, name)}: {field}: needs [eval] diagnostics' {part!r} part, which is off"
                )


# A run writes files named after each SAE: `<report>.<name>.densities.npz` beside the JSON report
# and `<thresholds>_<name>_eval_results.json` for SAEBench. File names hold at most 255 bytes; a
# name leaves room for the longer suffix and a stem of 64 bytes.
NAME_STEM_ROOM = 64
NAME_BYTES = 255 - NAME_STEM_ROOM - len("__eval_results.json")


def _check_names(loaded: LoadedThresholds, where: str) -> None:
    """Each [[sae]] name (given, or taken from its path) fits every file a run writes for it and
    holds no control character (NUL ends a C string; a newline splits a report line): refused
    here, before anything is evaluated, not when the first file is written."""
    for i, entry in enumerate(loaded.config.sae):
        key = "name" if entry.name else "path"
        name, size = entry.display_name, len(entry.display_name.encode())
        control = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
        if control is not None:
            problem = f"the name {name!r} holds the control character {control!r}"
        elif size > NAME_BYTES:
            problem = (
                f"the name {name[:24]!r}... is {size} bytes; the files a run writes for it "
                f"(<report>.<name>.densities.npz) leave {NAME_BYTES} bytes for a name"
            )
        else:
            continue
        raise ConfigError(f"{loaded.place(where, 'sae', i, key)}: sae.{i}.{key}: {problem}")


def _check_splices(loaded: LoadedThresholds, where: str) -> None:
    """Members are SAEs of this file, of one model, at different hooks (as far as the file says;
    hooks and models read from an SAE's cfg.json are checked again when it loads)."""
    config = loaded.config
    names = [entry.display_name for entry in config.sae]

    fail = _joint_checks(loaded, where, "splice", config.splice)
    for i, splice in enumerate(config.splice):
        unknown = [n for n in splice.saes if n not in names]
        if unknown:
            fail(i, "saes", f"no [[sae]] named {', '.join(map(repr, unknown))} (there are: {', '.join(names)})")
        if len(set(splice.saes)) != len(splice.saes):
            fail(i, "saes", "an SAE is named twice")
        members = config.splice_members(splice)
        models = {loaded.resolve_model(m) for e in members if (m := e.model or config.eval.model)}
        if len(models) > 1:
            fail(i, "saes", f"members of one splice must share a model, got {', '.join(sorted(models))}")
        problem = same_hook([(e.display_name, e.hook) for e in members if e.hook])
        if problem:
            fail(i, "saes", problem)


def _joint_checks(
    loaded: LoadedThresholds, where: str, kind: str, entries: Sequence[JointEntry]
) -> Callable[[int, str, str], NoReturn]:
    """What splices and CLTs share: names unique among their kind's entries, and a negative
    control that names gated metrics. Returns the one-line failure for the kind's own checks."""

    def fail(i: int, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{loaded.place(where, kind, i, key)}: {kind}.{i}.{key}: {message}")

    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.name in seen:
            fail(i, "name", f"two [[{kind}]] entries are named {entry.name!r}")
        seen.add(entry.name)
        missing = [m for m in entry.expect_fail if m not in entry.gate]
        if missing:
            fail(i, "expect_fail", f"names metrics without a bound: {', '.join(missing)}")
    return fail


def same_hook(members: list[tuple[str, str]]) -> str | None:
    """The complaint when two members of a splice sit at one hook (None when none do)."""
    at: dict[str, str] = {}
    for name, hook in members:
        if hook in at:
            return f"{at[hook]} and {name} are both at {hook}: a splice patches each hook once"
        at[hook] = name
    return None


def locate(text: str, loc: tuple[str | int, ...]) -> int:
    """Best line number for a validation error's location (tomllib keeps no positions)."""
    return TomlLines(text).locate(loc)


_ANY_HEADER = re.compile(r"\s*\[")
_TABLE_HEADER = re.compile(r"\s*\[\[?\s*([^\[\]\s]+)\s*\]")


@cache
def _key_pattern(key: str) -> re.Pattern[str]:
    """`key =` (or `, key =`, `{key =`) as a compiled pattern, compiled once per key."""
    return re.compile(rf"(^|[\s{{,]){re.escape(key)}\s*=")


class TomlLines:
    """A TOML text's table headers, scanned once: each entry's line is then found without
    reading the file from its start again (a release's file has thousands of `[[sae]]`)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[int] = []  # every line that opens a table (or starts with `[`)
        self.tables: dict[str, list[int]] = {}  # `[name]` / `[[name]]` -> its header lines, in order
        for i, line in enumerate(self.lines):
            if _ANY_HEADER.match(line):
                self.headers.append(i)
                if match := _TABLE_HEADER.match(line):
                    self.tables.setdefault(match.group(1), []).append(i)
        # each header line -> where its table ends (the next header, or the end of the file)
        self.ends = dict(zip(self.headers, [*self.headers[1:], len(self.lines)], strict=False))

    def locate(self, loc: tuple[str | int, ...]) -> int:
        """Walks the location: a table header (`[eval]`, the n-th `[[sae]]`), then the
        first `key =` (or inline `key = {`) line under it; falls back to the last line found."""
        line, start, end = 1, 0, len(self.lines)
        keys = list(loc)
        if keys and isinstance(keys[0], str):
            indexed = len(keys) > 1 and isinstance(keys[1], int)
            index = keys[1] if indexed else 0
            headers = self.tables.get(keys[0], [])
            if isinstance(index, int) and 0 <= index < len(headers):
                start = headers[index]
                line, end = start + 1, self.ends[start]
                keys = keys[2:] if indexed else keys[1:]
        for key in keys:
            if not isinstance(key, str):
                continue
            pattern = _key_pattern(key)
            for i in range(start, end):
                if pattern.search(self.lines[i]):
                    line, start = i + 1, i
                    break
        return line


def json_schema() -> dict[str, Any]:
    """JSON Schema of thresholds.toml, for editors (`#:schema ./thresholds.schema.json`)."""
    schema = Thresholds.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "sae-acceptance thresholds.toml"
    return schema


def write_json_schema(path: str | Path) -> None:
    """Write the thresholds file's JSON Schema to `path`, atomically."""
    write_atomic(path, json.dumps(json_schema(), indent=2) + "\n")
