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
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    assert "QUICK: 1 epoch, not 25" in result.stdout
    gpu = "GPU extraction (" if torch.cuda.is_available() else "GPU throughput not measured (no GPU)"
    assert gpu in result.stdout
    figures = json.loads(out.read_text())
    assert figures["images"] == 12 and figures["cold_x4"]["computed"] == 48
    assert figures["warm"]["cached"] == 12
    assert figures["tutorial"]["final_accuracy"] is not None and figures["tutorial_epochs"] == 1
    assert set(figures["ratios"]) == {"tutorial_over_cold", "peak_rss_x4_over_x1", "peak_pss_x4_over_x1"}
    assert all(v > 0 for v in figures["ratios"].values())
    assert figures["predict"]["median_s"] > 0 and figures["eval"]["median_s"] > 0
    layouts = {"threads", "processes"} if cpu_cores() > 1 else {"threads"}
    assert set(figures["backbones"]) == {"tf_efficientnet_lite0.pypi", "resnet18"}
    for backbone in figures["backbones"].values():
        # 8 training images: batches of 4 and 8, in one process and in a process per core, per runtime
        floors = backbone["floor"]["runtimes"]
        assert set(floors) == {"torch", "onnxruntime"}
        for floor in floors.values():
            assert floor["batch"] in (4, 8) and floor["layout"] in layouts
            assert {k: set(v) for k, v in floor["by_layout"].items()} == {k: {"4", "8"} for k in layouts}
            assert floor["images_per_s"] == max(v for by in floor["by_layout"].values() for v in by.values())
        assert backbone["floor"]["fastest"] == max(floors, key=lambda rt: floors[rt]["images_per_s"])
        # the exported model is cached after the first run: the cold runs use it, or torch when asked
        runtimes = [backbone[run]["runtime"] for run in ("first", "cold", "torch")]
        assert runtimes == ["onnxruntime", "onnxruntime", "torch"]
        assert all(backbone[run]["computed"] == 12 for run in ("first", "cold", "torch"))
        assert all(v > 0 for v in backbone["ratios"].values())
    assert "targets:" in result.stdout and result.stdout.count("met ") >= 8
