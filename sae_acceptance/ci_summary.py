"""GitHub Actions: a markdown step summary and `::error` annotations, the same from pytest and the CLI.

When `GITHUB_STEP_SUMMARY` names a file, the gate appends its verdict table, its
failures (one line each) and its regression changes to it; each failed check is
also printed as a workflow command, `::error file=thresholds.toml,line=N::…`,
pointing at its entry's `[[sae]]` (or `[[splice]]`) line, which GitHub shows on
the pull request's diff. Nothing here decides: the failures are the ones pytest
reported, or `verdict.outcome`'s for the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_acceptance.baseline import RegressionCheck
from sae_acceptance.config import LoadedThresholds, splice_key
from sae_acceptance.render import format_table
from sae_acceptance.report import (
    REGRESSION_HEADER,
    SPLICE_HEADER,
    SUMMARY_HEADER,
    regression_rows,
    splice_rows,
    summary_rows,
)
from sae_acceptance.results import EvalReport, SAEResult

SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


@dataclass(frozen=True)
class Failure:
    """One failed check: where its entry is written, what it is, and its one-line message."""

    file: str
    line: int
    title: str
    message: str


def workspace_path(path: str | Path) -> str:
    """A path as GitHub resolves annotation files: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def failures_of(
    report: EvalReport, loaded: LoadedThresholds, regressions: Iterable[tuple[str, RegressionCheck]] = ()
) -> list[Failure]:
    """The CLI's failures: errors, checks whose outcome is not as expected, and regressions, each
    at its entry's line (what pytest reports as failed items)."""
    file = workspace_path(loaded.path)
    lines = {entry.display_name: loaded.line_of("sae", i) for i, entry in enumerate(loaded.config.sae)}
    lines.update({s.key: loaded.line_of("splice", i) for i, s in enumerate(loaded.config.splice)})
    failures = []
    for result in report.entries:
        node = result.name if isinstance(result, SAEResult) else splice_key(result.name)
        line = lines.get(node, 1)
        if result.error is not None:
            failures.append(Failure(file, line, f"{loaded.path.name}::{node}", result.error))
            continue
        for metric in result.verdicts:
            decided = result.outcome(metric)
            if not decided.as_expected:
                failures.append(Failure(file, line, f"{loaded.path.name}::{node}::{metric}", decided.message))
    for node, check in regressions:
        if not check.passed:
            title = f"{loaded.path.name}::{node}::regression_{check.metric}"
            failures.append(Failure(file, lines.get(node, 1), title, check.message))
    return failures


def markdown(
    gate: Sequence[Sequence[str]],
    splices: Sequence[Sequence[str]],
    changes: Sequence[Sequence[str]],
    failures: Sequence[Failure],
) -> str:
    """The step summary: verdicts, failures with their messages, regression changes."""
    verdict = "failed" if failures else "passed"
    parts = [f"## SAE acceptance: {verdict}", ""]
    if gate:
        parts += [format_table(SUMMARY_HEADER, gate, markdown=True), ""]
    if splices:
        parts += ["### Splices", "", format_table(SPLICE_HEADER, splices, markdown=True), ""]
    if failures:
        parts += [f"### Failures ({len(failures)})", ""]
        parts += [f"- `{f.title}` ({f.file}:{f.line}): {_one_line(f.message)}" for f in failures]
        parts.append("")
    if changes:
        parts += [
            "### Regression changes against the baseline",
            "",
            format_table(REGRESSION_HEADER, changes, markdown=True),
            "",
        ]
    return "\n".join(parts) + "\n"


def report_markdown(
    report: EvalReport, failures: Sequence[Failure], regressions: Iterable[tuple[str, RegressionCheck]] = ()
) -> str:
    """`markdown` of a whole report (the CLI)."""
    return markdown(
        summary_rows(report.saes.values()), splice_rows(report.splices.values()), regression_rows(regressions), failures
    )


def annotation(failure: Failure) -> str:
    """A workflow command: `::error file=F,line=N,title=T::message` (values escaped as GitHub asks)."""

    def prop(text: str) -> str:
        return _escape(text).replace(":", "%3A").replace(",", "%2C")

    return (
        f"::error file={prop(failure.file)},line={failure.line},title={prop(failure.title)}::{_escape(failure.message)}"
    )


def in_actions(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get(SUMMARY_ENV)) or environ.get("GITHUB_ACTIONS") == "true"


def publish(text: str, failures: Sequence[Failure], environ: Mapping[str, str] = os.environ) -> list[str]:
    """Append `text` to the step summary file (when set); return the annotation lines to print
    on stdout (none outside GitHub Actions)."""
    target = environ.get(SUMMARY_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as handle:  # appended: other steps write to it too
            handle.write(text)
    return [annotation(f) for f in failures] if in_actions(environ) else []


def _one_line(message: str) -> str:
    return " ".join(message.split()).replace("|", "\\|")


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
