"""pytest plugin: thresholds files as tests. Hooks, options and fixtures only.

`pytest thresholds.toml` collects one collector per `[[sae]]` and one item per
gated metric (`thresholds.toml::<sae>::<metric>`), plus an `r2` item that warns
where the PR canyon flags the layer and `regression_<metric>` items when a
baseline is given; a `[[splice]]` group's items are `thresholds.toml::splice:<name>::<metric>`.
Under GitHub Actions the gate's summary goes to `$GITHUB_STEP_SUMMARY` and each
failed item becomes an `::error` annotation at its entry's line. The plugin is inert until a thresholds file is collected or
a `--sae-*` option is given: installed beside an unrelated suite, it loads no
model, imports no torch and changes no environment variable.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_sae_acceptance.items import ThresholdsFile, _SAEItem, _SpliceItem, sae_session
from pytest_sae_acceptance.selection import (
    PYTEST_FLAGS,
    SELECTED_KEY,
    SESSION_KEY,
    SHARDED_KEY,
    SPLICES_KEY,
    Part,
    is_xdist_worker,
    process_part,
)
from sae_acceptance.baseline import add_refresh_options
from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import EXIT_ERROR, SAEAcceptanceError
from sae_acceptance.shard import RUN_ID_VARIABLES, Shard, shard_members
from sae_acceptance.train import builtin_profiles
from sae_acceptance.train.sweep_profile import DEFAULT_PROFILE

if TYPE_CHECKING:
    from xdist.remote import Producer
    from xdist.workermanage import WorkerController

    from pytest_sae_acceptance.outputs import RunOutcome  # noqa: F401  # OUTCOME_KEY names it
    from pytest_sae_acceptance.scheduling import SAEGroupScheduling
    from sae_acceptance.results import CLTResult, EvalReport, SAEResult

PARTS_KEY = pytest.StashKey[list[Part]]()
OUTCOME_KEY = pytest.StashKey["RunOutcome"]()
ACTIVATING_OPTIONS = (
    "--sae-json",
    "--sae-baseline",
    "--sae-update-baseline",
    "--sae-thresholds",
    "--sae-sweep",
    "--sae-shard",
    "--sae-html",
    "--sae-saebench-json",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The `--sae-*` options and the ini values naming thresholds files."""
    group = parser.getgroup("sae-acceptance", "SAE acceptance gate")
    group.addoption("--sae-json", metavar="PATH", help="write the full JSON report here")
    group.addoption("--sae-baseline", metavar="PATH", help="compare against this regression baseline")
    # Two flags, not one with an optional value: an optional value would swallow the path after it.
    add_refresh_options(group.addoption, PYTEST_FLAGS, "sae_update_baseline")
    group.addoption("--sae-thresholds", metavar="PATH", help="thresholds file for the sae_eval fixture")
    group.addoption(
        "--sae-sweep",
        metavar="PROFILE",
        default=None,
        help=f"training profile for the sae_sweep fixture ({', '.join(builtin_profiles())}, or a .toml; "
        f"default {DEFAULT_PROFILE})",
    )
    group.addoption(
        "--sae-sweep-cache", metavar="DIR", help="trained-SAE cache (default ~/.cache/sae-acceptance/sweeps)"
    )
    group.addoption("--sae-no-progress", action="store_true", help="hide the evaluations' progress")
    group.addoption("--sae-html", metavar="PATH", help="write the self-contained HTML report here")
    group.addoption("--sae-saebench-json", metavar="DIR", help="write each SAE's SAEBench core result here")
    group.addoption(
        "--sae-shard", metavar="I/N", help="run shard I of N of the SAEs (units kept whole); the rest are deselected"
    )
    group.addoption(
        "--sae-run-id",
        metavar="ID",
        help=f"the run a shard belongs to, for `merge` (default: ${' or $'.join(RUN_ID_VARIABLES)})",
    )
    parser.addini("sae_thresholds", "thresholds file for the sae_eval fixture", default="thresholds.toml")
    parser.addini("sae_thresholds_pattern", "file names collected as thresholds files", default="thresholds*.toml")


def asked_for(config: pytest.Config) -> bool:
    """Whether this run is the plugin's: a `--sae-*` option, or a thresholds file among the
    paths to collect (given, or directly inside a directory given)."""
    if any(config.getoption(option) for option in ACTIVATING_OPTIONS) or named_toml(config):
        return True
    pattern = config.getini("sae_thresholds_pattern")
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        if fnmatch.fnmatch(path.name, pattern):
            return True
        if path.is_dir() and any(fnmatch.fnmatch(child.name, pattern) for child in path.iterdir()):
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    """Register the `sae` marker; parse `--sae-shard` once, a bad value a usage error."""
    config.addinivalue_line("markers", "sae: an SAE acceptance check from a thresholds file")
    if isinstance(config.option.sae_shard, str):
        try:
            config.option.sae_shard = Shard.parse(config.option.sae_shard)
        except SAEAcceptanceError as err:
            raise pytest.UsageError(f"--sae-shard: {err}") from None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> SAEGroupScheduling | None:
    """Under the default `--dist load`, a run that collects thresholds files keeps each SAE
    group (one model and hook) on one worker; every other test is spread one by one."""
    if config.getoption("dist") != "load" or not asked_for(config):
        return None
    from pytest_sae_acceptance.scheduling import (
        SAEGroupScheduling,  # xdist is optional: only when it runs
    )

    return SAEGroupScheduling(config, log)


def named_toml(config: pytest.Config) -> set[Path]:
    """`.toml` files named on the command line: collected as thresholds files whatever
    `sae_thresholds_pattern` says (`pytest gate.toml`)."""
    given = (Path(config.invocation_params.dir, arg.split("::", 1)[0]) for arg in config.args)
    return {path.resolve() for path in given if path.suffix == ".toml" and path.is_file()}


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> ThresholdsFile | None:
    """A thresholds file (by the ini pattern, or any `.toml` named on the command line) as a test file."""
    pattern = parent.config.getini("sae_thresholds_pattern")
    if fnmatch.fnmatch(file_path.name, pattern) or (
        file_path.suffix == ".toml" and file_path.resolve() in named_toml(parent.config)
    ):
        return ThresholdsFile.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def sae_eval(request: pytest.FixtureRequest) -> Callable[[str], SAEResult | CLTResult]:
    """`sae_eval("name")` -> that SAE's `sae_acceptance.SAEResult` (`"clt:name"`: a CLT's
    `CLTResult`), evaluated once per run.

    The thresholds file is `--sae-thresholds`, else the `sae_thresholds` ini value,
    relative to the directory pytest was started from.
    """
    config = request.config
    path = Path(config.getoption("--sae-thresholds") or config.getini("sae_thresholds")).expanduser()
    path = path if path.is_absolute() else config.invocation_params.dir / path
    loaded = load_thresholds(path)
    return lambda name: sae_session(config).result(loaded, name)


@pytest.fixture(scope="session")
def sae_sweep(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[EvalReport, list[dict[str, Any]], Path]:
    """The SAEs of the `--sae-sweep` profile, trained or loaded from the cache, gated and tabulated.

    Returns `(report, points, out_dir)`: the `EvalReport`, the sweep points, and the
    directory holding report.json, points.json and the analysis tables and plots.
    """
    out = tmp_path_factory.mktemp("sae-sweep")
    return sae_session(request.config).sweep(out)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--sae-shard I/N`: deselect the SAEs outside this shard, and the splices whose members are."""
    shard = config.getoption("--sae-shard")
    if shard is None:
        return
    members: dict[Path, set[str]] = {}
    sharded = config.stash.setdefault(SHARDED_KEY, {})
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if isinstance(item, _SAEItem | _SpliceItem):
            loaded = item.parent.loaded
            if loaded.path not in members:
                names = shard_members(loaded, shard)
                members[loaded.path], sharded[loaded.path] = set(names), (loaded, names)
            needed = [item.sae.entry.key] if isinstance(item, _SAEItem) else item.splice.entry.saes
            (keep if set(needed) <= members[loaded.path] else dropped).append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    """Record which SAEs and splices have a selected item, per file: only those are evaluated."""
    items = session.items
    saes = [(i.sae.loaded.path, i.sae.entry.key) for i in items if isinstance(i, _SAEItem)]
    splices = [(i.splice.loaded.path, i.splice.entry.name) for i in items if isinstance(i, _SpliceItem)]
    session.config.stash[SELECTED_KEY] = _by_file(saes)
    session.config.stash[SPLICES_KEY] = _by_file(splices)


def _by_file(entries: list[tuple[Path, str]]) -> dict[Path, list[str]]:
    """Entry names with at least one selected item, per thresholds file, in order and once each."""
    selected: dict[Path, list[str]] = {}
    for path, name in dict.fromkeys(entries):
        selected.setdefault(path, []).append(name)
    return selected


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Workers hand their part to the controller; the controller (or a plain run) turns every part
    into the one report and writes it through `gate.write_outputs`, each file once, atomically."""
    config = session.config
    state = config.stash.get(SESSION_KEY, None)
    mine = state.part() if state is not None else process_part(config, {}) if SHARDED_KEY in config.stash else None
    if is_xdist_worker(config):
        config.workeroutput["sae_parts"] = [] if mine is None else [mine.to_wire()]  # type: ignore[attr-defined]  # xdist sets it on workers
        return
    parts = ([] if mine is None else [mine]) + config.stash.get(PARTS_KEY, [])
    if not parts:
        return
    from pytest_sae_acceptance.outputs import RunOutcome  # the gate's writers load only when there is a gate

    outcome = config.stash[OUTCOME_KEY] = RunOutcome.of(config, parts, exitstatus == pytest.ExitCode.INTERRUPTED)
    if outcome.error is not None or outcome.exit_status == EXIT_ERROR:
        session.exitstatus = EXIT_ERROR
    elif exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and outcome.empty_shard:
        session.exitstatus = pytest.ExitCode.OK  # nothing to evaluate is this shard's whole, correct share
    if outcome.error is not None:
        outcome.count_as_error(config)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: WorkerController, error: object) -> None:
    """xdist controller: gather each worker's part."""
    received = getattr(node, "workeroutput", {}).get("sae_parts", [])
    node.config.stash.setdefault(PARTS_KEY, []).extend(Part.from_wire(part) for part in received)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: pytest.ExitCode, config: pytest.Config
) -> None:
    """The gate's tables, where its outputs went, and a failed write, after pytest's own summary."""
    outcome = config.stash.get(OUTCOME_KEY, None)
    if outcome is not None:
        outcome.show(terminalreporter)
