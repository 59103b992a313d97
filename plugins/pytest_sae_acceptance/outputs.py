"""The controller's end of a run: every process's part as one report, written by `gate.write_outputs`.

Imported only once a run has a gate's parts (it loads the library's writers and,
through them, torch), so an unrelated suite never pays for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_sae_acceptance.selection import Part, baseline_path, baseline_target
from sae_acceptance.baseline import BaselineEntry, baseline_entries, sidecar_path
from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.gate import Outputs, exit_status, write_outputs
from sae_acceptance.report import merge_reports, tables, worst_lines
from sae_acceptance.results import EvalReport, ShardRecord
from sae_acceptance.shard import Shard, run_fingerprint, run_id


@dataclass
class RunOutcome:
    """The run's one report, what writing it said, and an output that could not be written."""

    report: EvalReport
    shard: Shard | None
    empty_shard: bool
    lines: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def exit_status(self) -> int:
        """The gate's exit status for this run's report (`gate.exit_status`)."""
        return exit_status(self.report)

    @classmethod
    def of(cls, config: pytest.Config, parts: list[Part], interrupted: bool) -> RunOutcome:
        """Merge the parts and write the outputs (a baseline only when the run was not interrupted)."""
        by_file: dict[Path, list[EvalReport]] = {}
        for part in parts:
            for path in part.sharded:
                by_file.setdefault(path, [])
            for path, report in part.reports.items():
                by_file.setdefault(path, []).append(report)
        per_file = {path: merge_reports(reports) or EvalReport.empty() for path, reports in by_file.items()}
        report = merge_reports(per_file.values()) or EvalReport.empty()
        shard = config.getoption("--sae-shard")
        if shard is not None:
            selected = list(dict.fromkeys(name for part in parts for name in part.selected))
            files = [load_thresholds(path) for path in by_file]
            compared = [given for loaded in files if (given := baseline_path(config, loaded)) is not None]
            inputs = [file for path in compared for file in (path, sidecar_path(path))]
            run = run_id(config.getoption("--sae-run-id"))
            report.shard = ShardRecord(
                shard.index, shard.count, selected, run, run_fingerprint(files, shard.count, inputs)
            )
        outcome = cls(report, shard, empty_shard=any(p.empty_shard for p in parts) and not report.entries)
        json_path, html_path = config.getoption("--sae-json"), config.getoption("--sae-html")
        saebench = config.getoption("--sae-saebench-json")
        update = config.getoption("--sae-update-baseline")
        try:
            refresh = {} if interrupted or not update else _refreshed(config, per_file)
            outputs = Outputs(
                json=None if json_path is None else Path(json_path).expanduser(),
                html=None if html_path is None else Path(html_path).expanduser(),
                saebench=None if saebench is None else Path(saebench).expanduser(),
                refresh=refresh,
                force=update == "force",
            )
            outcome.lines = write_outputs(report, outputs)
        except SAEAcceptanceError as err:  # a baseline that may not be replaced, an unwritable path
            outcome.error = str(err)
        except OSError as err:  # the system refused a write midway (a full disk)
            outcome.error = f"{err.filename or 'output'}: cannot write ({err.strerror or err})"
        return outcome

    def show(self, terminalreporter: pytest.TerminalReporter) -> None:
        """The run's tables, where each output went, the annotations, and a failed write."""
        if self.shard is not None and self.empty_shard:
            terminalreporter.write_line(f"sae-acceptance: {self.shard.empty_note()}")
        shown = tables(self.report)
        if shown:
            terminalreporter.section("SAE acceptance")
            terminalreporter.write_line("\n\n".join(table for _, table in shown))
        for line in worst_lines(self.report):
            terminalreporter.write_line(line)
        for line in self.lines:
            terminalreporter.write_line(line)
        if self.error is not None:
            terminalreporter.write_line(f"ERROR sae-acceptance: {self.error}", red=True)

    def count_as_error(self, config: pytest.Config) -> None:
        """A write that failed is one error in the run's closing line, not a silent exit status."""
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            failed = pytest.CollectReport("sae-acceptance outputs", "failed", self.error, [])
            reporter.stats.setdefault("error", []).append(failed)


def _refreshed(config: pytest.Config, per_file: dict[Path, EvalReport]) -> dict[Path, dict[str, BaselineEntry]]:
    """Each thresholds file's baseline target and this run's entries for it (none for an empty shard)."""
    refresh: dict[Path, dict[str, BaselineEntry]] = {}
    for path, report in per_file.items():
        loaded = load_thresholds(path)
        refresh.setdefault(baseline_target(config, loaded), {}).update(baseline_entries(report, loaded.config.eval))
    return refresh
