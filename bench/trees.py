"""The code under test in a benchmark: this tree's ``src/``, and an earlier commit's, beside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trees(before: str | None, work: Path) -> dict[str, Path]:
    """``{"before": its src/, "after": this tree's src/}``; the earlier commit's ``src/`` is taken from
    git archive into ``work`` (once). Without ``before``, this tree only."""
    if before is None:
        return {"after": REPO / "src"}
    folder = work / f"src-{before}"
    if not folder.is_dir():
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", before, "src"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
        (work / "src").rename(folder)
    return {"before": folder, "after": REPO / "src"}
