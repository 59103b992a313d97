"""Published tables as test data: CSV rows with numbers parsed, and sweep points from them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sae_acceptance.train.tables import SweepPoint


def _cell(text: str) -> int | float | str | None:
    """A CSV cell as a number where it is one; an empty cell is None."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV with numbers parsed."""
    with open(path, newline="") as handle:
        return [{name: _cell(text) for name, text in row.items()} for row in csv.DictReader(handle)]


def points_from_csv(path: str | Path, **defaults: Any) -> list[SweepPoint]:
    """Points from a CSV in the reference layout; `defaults` supply columns the file lacks (depth='mid')."""
    points = []
    for row in read_table(path):
        record = defaults | row
        low, high = record.pop("ce_rec_ci_low", None), record.pop("ce_rec_ci_high", None)
        if low is not None and high is not None:
            record["ce_rec_ci"] = (low, high)
        points.append(SweepPoint.from_mapping(record))
    return points
