"""GitHub Actions: a markdown step summary and `::error` annotations, the same from every path.

When `GITHUB_STEP_SUMMARY` names a file, the gate appends its tables and its
failures (one line each) to it; each failed check is also printed as a workflow
command, `::error file=thresholds.toml,line=N::…`, pointing at its entry's
`[[sae]]` (or `[[splice]]`) line, which GitHub shows on the pull request's diff.
Nothing here decides: the failures are the report's (`report.problems`), and the
line is where the entry says it was declared (`EntryResult.source`), so `merge`
annotates exactly as a single run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_acceptance.report import problems, tables
from sae_acceptance.results import EvalReport
from sae_acceptance.verdict import EntryStatus

SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


@dataclass(frozen=True)
class Failure:
    """One failed check: where its entry is written, what it is, and its one-line message."""

    file: str | None
    line: int | None
    title: str
    message: str


def failures_of(report: EvalReport) -> list[Failure]:
    """Every error and every check not as expected (regressions included), each at its entry's line."""
    found = []
    for result in report.entries:
        source = result.source
        prefix = f"{Path(source.file).name}::" if source else ""
        for kind, node, message in problems(result):
            if kind in ("ERROR", "FAIL"):
                found.append(
                    Failure(source.file if source else None, source.line if source else None, prefix + node, message)
                )
    return found


def markdown(report: EvalReport, failures: Sequence[Failure]) -> str:
    """The step summary: the verdict, the tables, the failures with their messages."""
    failed = bool(failures) or any(r.status in (EntryStatus.FAIL, EntryStatus.ERROR) for r in report.entries)
    parts = [f"## SAE acceptance: {'failed' if failed else 'passed'}", ""]
    for title, table in tables(report, markdown=True):
        parts += [f"### {title}", "", table, ""]
    if failures:
        parts += [f"### Failures ({len(failures)})", ""]
        parts += [f"- `{f.title}`{_where(f)}: {_one_line(f.message)}" for f in failures]
        parts.append("")
    return "\n".join(parts) + "\n"


def _where(failure: Failure) -> str:
    return f" ({failure.file}:{failure.line})" if failure.file else ""


def annotation(failure: Failure) -> str:
    """A workflow command: `::error file=F,line=N,title=T::message` (values escaped as GitHub asks)."""

    def prop(text: str) -> str:
        return _escape(text).replace(":", "%3A").replace(",", "%2C")

    place = f"file={prop(failure.file)},line={failure.line}," if failure.file else ""
    return f"::error {place}title={prop(failure.title)}::{_escape(failure.message)}"


def in_actions(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs in a GitHub Actions job."""
    return bool(environ.get(SUMMARY_ENV)) or environ.get("GITHUB_ACTIONS") == "true"


def publish(report: EvalReport, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Append the step summary to its file (when set); return the annotation lines to print on
    stdout (none outside GitHub Actions)."""
    failures = failures_of(report)
    target = environ.get(SUMMARY_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as handle:  # appended: other steps write to it too
            handle.write(markdown(report, failures))
    return [annotation(f) for f in failures] if in_actions(environ) else []


def _one_line(message: str) -> str:
    return " ".join(message.split()).replace("|", "\\|")


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
