"""The benchmark's quick mode runs end to end on a small dataset and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tlx.recipe import cpu_cores

from .conftest import REPO, make_imagefolder


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=(4, 2))
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, REPO / "bench" / "benchmark.py", "--data", data, "--quick", "--json", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "QUICK: 1 epoch, not 25" in result.stdout
    gpu = "GPU extraction (" if torch.cuda.is_available() else "GPU throughput not measured (no GPU)"
    assert gpu in result.stdout
    figures = json.loads(out.read_text())
    assert figures["images"] == 12 and figures["cold_x4"]["images"] == 48
    assert figures["warm"]["cached"] == 12
    assert figures["tutorial"]["final_accuracy"] is not None and figures["tutorial_epochs"] == 1
    assert set(figures["ratios"]) == {
        "cold_over_floor", "extract_over_floor", "cold_minus_warm_over_floor", "tutorial_over_cold",
        "peak_rss_x4_over_x1", "peak_pss_x4_over_x1",
    }  # fmt: skip
    assert all(v > 0 for v in figures["ratios"].values())
    floor = figures["floor"]  # 8 images: batches of 4 and 8, in one process and in a process per core
    assert floor["batch"] in (4, 8) and floor["layout"] in ("threads", "processes")
    layouts = {"threads", "processes"} if cpu_cores() > 1 else {"threads"}
    assert {k: set(v) for k, v in floor["by_layout"].items()} == {k: {"4", "8"} for k in layouts}
    assert floor["images_per_s"] == max(v for by in floor["by_layout"].values() for v in by.values())
    assert "targets:" in result.stdout and result.stdout.count("met ") >= 4
