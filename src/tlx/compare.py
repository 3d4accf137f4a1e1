"""``tlx compare``: runs side by side, with only the recipe keys that differ between them.

A folder given is a run folder (it holds ``metrics.json``) or a sweep folder (its subfolders are
runs). A key that some runs lack (another head's options) is shown only where runs that have it
disagree; the head type already tells those runs apart. A run whose ``recipe.yaml`` or
``metrics.json`` cannot be read or holds what no run writes is left out of the table, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlx.errors import TlxError, describe, shorten
from tlx.recipe import dotted, read_yaml
from tlx.runfiles import METRICS_FILE, RECIPE_FILE, read_metrics


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders among ``paths``: each run folder, and the run folders inside each sweep folder."""
    found: list[Path] = []
    for path in paths:
        if (path / METRICS_FILE).is_file():
            found.append(path)
            continue
        try:
            inside = (
                sorted(p for p in path.iterdir() if not p.is_symlink() and (p / METRICS_FILE).is_file())
                if path.is_dir()
                else []
            )
        except OSError as exc:
            raise TlxError(
                f"{path}: cannot list it ({describe(exc)}); check the folder's permissions"
            ) from None
        if not inside:
            raise TlxError(
                f"{path}: not a tlx run or sweep folder (no {METRICS_FILE} in it or its subfolders); "
                "pass the --out of tlx run or tlx sweep"
            )
        found.extend(inside)
    unique = {p.resolve(): p for p in reversed(found)}  # a run given twice is shown once, first place
    return [p for p in found if unique.get(p.resolve()) is p]


@dataclass
class Comparison:
    """The recipe keys that differ, one row per readable run, and the runs that could not be read."""

    keys: list[str]
    #: each run's folder, the differing keys, its scores and seconds
    rows: list[dict[str, Any]]
    #: each damaged run's folder, with the one-line reason
    damaged: list[tuple[Path, str]]


def compare(paths: list[Path]) -> Comparison:
    """The runs in ``paths`` side by side; a damaged run is listed apart and the rest are compared."""
    runs, damaged = [], []
    for folder in run_folders(paths):
        try:
            recipe = dotted(read_yaml(folder / RECIPE_FILE))
            runs.append((folder, recipe, read_metrics(folder / METRICS_FILE)))
        except TlxError as exc:
            damaged.append((folder, str(exc)))
    keys = [
        key
        for key in dict.fromkeys(k for _, recipe, _ in runs for k in recipe)
        if len({json.dumps(recipe[key], sort_keys=True) for _, recipe, _ in runs if key in recipe}) > 1
    ]
    rows = [
        {
            "run": str(folder),
            **{key: recipe.get(key) for key in keys},
            "test_accuracy": metrics.test_accuracy,
            "selection": metrics.selection.mean if metrics.selection else None,
            "selection_std": metrics.selection.std if metrics.selection else None,
            "seconds": metrics.seconds.total,
        }
        for folder, recipe, metrics in runs
    ]
    return Comparison(keys, rows, damaged)


def cells(keys: list[str], rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The table as text: a header and one list of cells per run."""
    header = ["run", *keys, "test accuracy", "selection (mean ± std)", "seconds"]
    table = []
    for row in rows:
        selection = (
            f"{row['selection']:.2%} ± {row['selection_std']:.2%}" if row["selection"] is not None else "-"
        )
        table.append(
            [
                row["run"],
                *(_cell(row[key]) for key in keys),
                f"{row['test_accuracy']:.2%}",
                selection,
                f"{row['seconds']:.1f}",
            ]
        )
    return header, table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, dict)):
        return shorten(json.dumps(value), 40)
    return shorten(str(value), 40)


def markdown(header: list[str], table: list[list[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""
    lines = [header, ["---"] * len(header), *table]
    return "".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |\n" for line in lines)


def aligned(header: list[str], table: list[list[str]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n" for line in [header, *table]
    )
