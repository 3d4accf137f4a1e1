"""The everyday commands on ants/bees, this tree against an earlier commit, rounds interleaved.

Per round and tree (tlx from its ``src/`` on PYTHONPATH, the plugins as installed): ``tlx run`` of the
Lite0 recipe with an empty cache (first ever: build, export, probe, extract), cold with the backbone
and its export cached (features deleted), warm; ``tlx predict`` of two images and ``tlx eval`` on that
run; and the best recipe (Lite2, flip) cold with an empty cache. Wall seconds of each process, and the
test accuracy each run reports. Then, in this tree only, a warm run in this process with its figures
drawn by the helper process and in the process itself (``--figures``).

    python bench/commands.py --data ../shared/data/hymenoptera_data --before c0c5197 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trees import trees as source_trees

REPO = Path(__file__).resolve().parents[1]
LITE0, BEST = (
    REPO / "src" / "tlx" / "recipes" / "hymenoptera-lite0.yaml",
    REPO / "src" / "tlx" / "recipes" / "hymenoptera-best.yaml",
)


def timed(src: Path, *args: object) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    command = [sys.executable, "-m", "tlx", *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"tlx {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return round(time.perf_counter() - started, 2)


def accuracy(out: Path) -> float:
    return round(100 * json.loads((out / "metrics.json").read_text())["test_accuracy"], 2)


def round_of(src: Path, data: Path, work: Path) -> dict:
    cache = work / "cache"
    sets = ["--set", f"dataset.root={data}", "--cache-dir", cache]
    figures: dict = {"first_run_s": timed(src, "run", LITE0, *sets, "--out", work / "a")}
    shutil.rmtree(cache / "features")
    figures["cold_run_s"] = timed(src, "run", LITE0, *sets, "--out", work / "b")
    figures["warm_run_s"] = timed(src, "run", LITE0, *sets, "--out", work / "c")
    images = sorted((data / "val" / "bees").glob("*.jpg"))[:2]
    figures["predict_2_s"] = timed(src, "predict", work / "c", *images, "--cache-dir", cache)
    figures["eval_s"] = timed(src, "eval", work / "c", "--cache-dir", cache)
    figures["lite0_accuracy"] = accuracy(work / "c")
    best = ["--set", f"dataset.root={data}", "--cache-dir", work / "best-cache", "--out", work / "d"]
    figures["best_first_run_s"] = timed(src, "run", BEST, *best)
    figures["best_accuracy"] = accuracy(work / "d")
    return figures


def figures_helper(data: Path, work: Path, rounds: int) -> dict:
    """A warm run in this process: its figures drawn by the helper process, then in this process."""
    sys.path.insert(0, str(REPO / "src"))
    from tlx.plots import Painter
    from tlx.recipe import load_recipe
    from tlx.report import QuietConsole
    from tlx.run import run

    recipe = load_recipe(LITE0, (f"dataset.root={data}",))
    cache = work / "figures-cache"
    run(recipe, str(LITE0), work / "figures-warmup", cache, console=QuietConsole())
    seconds: dict[str, list[float]] = {"helper": [], "inline": []}
    for k in range(rounds):
        for label in seconds:
            started = time.perf_counter()
            with Painter(inline=label == "inline") as painter:
                run(recipe, str(LITE0), work / f"figures-{label}-{k}", cache, painter, QuietConsole())
            seconds[label].append(round(time.perf_counter() - started, 2))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data")
    parser.add_argument("--before", help="an earlier commit to compare with (its src/ from git archive)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--figures", action="store_true", help="also time the figure helper process")
    args = parser.parse_args()
    data = args.data.resolve()
    work = Path(tempfile.mkdtemp(prefix="tlx-commands-"))
    try:
        trees = source_trees(args.before, work)
        rows = []
        for k in range(args.rounds):
            for label, src in trees.items():
                rows.append({"code": label, "round": k + 1, **round_of(src, data, work / f"{label}-{k}")})
                print(json.dumps(rows[-1]), flush=True)
        for label in trees:
            mine = [r for r in rows if r["code"] == label]
            medians = {key: statistics.median(r[key] for r in mine) for key in mine[0] if key.endswith("_s")}
            print(f"{label} medians: {json.dumps(medians)}", flush=True)
        if args.figures:
            print(json.dumps({"warm_run_in_process_s": figures_helper(data, work, args.rounds)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
