"""``tlx compare``: runs side by side, with only the recipe keys that differ between them.

A folder given is a run folder (it holds ``metrics.json``) or a sweep folder (its subfolders are
runs). A key that some runs lack (another head's options) is shown only where runs that have it
disagree; the head type already tells those runs apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tlx.errors import TlxError, describe, shorten
from tlx.recipe import dotted

METRICS_FILE = "metrics.json"
RECIPE_FILE = "recipe.yaml"


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders among ``paths``: each run folder, and the run folders inside each sweep folder."""
    found: list[Path] = []
    for path in paths:
        if (path / METRICS_FILE).is_file():
            found.append(path)
            continue
        inside = (
            sorted(p for p in path.iterdir() if not p.is_symlink() and (p / METRICS_FILE).is_file())
            if path.is_dir()
            else []
        )
        if not inside:
            raise TlxError(
                f"{path}: not a tlx run or sweep folder (no {METRICS_FILE} in it or its subfolders); "
                "pass the --out of tlx run or tlx sweep"
            )
        found.extend(inside)
    unique = {p.resolve(): p for p in reversed(found)}  # a run given twice is shown once, first place
    return [p for p in found if unique.get(p.resolve()) is p]


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise TlxError(f"{path}: cannot read it ({describe(exc)}); restore the file the run wrote") from None


def compare(paths: list[Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """The differing recipe keys, and one row per run: its folder, those keys, its scores and seconds."""
    folders = run_folders(paths)
    recipes, metrics = [], []
    for folder in folders:
        recipe, data = _read(folder / RECIPE_FILE), _read(folder / METRICS_FILE)
        if not isinstance(data, dict) or not isinstance(data.get("test_accuracy"), (int, float)):
            raise TlxError(f"{folder / METRICS_FILE}: holds no test_accuracy; restore the file the run wrote")
        recipes.append(dotted(recipe if isinstance(recipe, dict) else {}))
        metrics.append(data)
    keys = [
        key
        for key in dict.fromkeys(k for r in recipes for k in r)
        if len({json.dumps(r[key], sort_keys=True) for r in recipes if key in r}) > 1
    ]
    rows = []
    for folder, recipe, data in zip(folders, recipes, metrics):
        selection = data.get("selection") or {}
        rows.append(
            {
                "run": str(folder),
                **{key: recipe.get(key) for key in keys},
                "test_accuracy": data["test_accuracy"],
                "selection": selection.get("mean"),
                "selection_std": selection.get("std"),
                "seconds": (data.get("seconds") or {}).get("total"),
            }
        )
    return keys, rows


def cells(keys: list[str], rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The table as text: a header and one list of cells per run."""
    header = ["run", *keys, "test accuracy", "selection (mean ± std)", "seconds"]
    table = []
    for row in rows:
        selection = (
            f"{row['selection']:.2%} ± {row['selection_std']:.2%}" if row["selection"] is not None else "-"
        )
        seconds = f"{row['seconds']:.1f}" if isinstance(row["seconds"], (int, float)) else "-"
        table.append(
            [
                row["run"],
                *(_cell(row[key]) for key in keys),
                f"{row['test_accuracy']:.2%}",
                selection,
                seconds,
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
