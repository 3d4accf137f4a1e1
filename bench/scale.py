"""Issue 23's machinery at scale: what a head's training and a sweep cost at 20,000 images.

Builds an image folder of ``--images`` photos from the shared data (ants, bees, cats and dogs; each
source photo several times, randomly cropped, mirrored and re-encoded, the variants of one photo in one
split), extracts its EfficientNet-Lite0 features once, then times on those cached features, for this
tree and optionally an earlier commit (``--before``, its ``src/`` from git archive), rounds alternating:

- ``tlx run`` warm with the linear and the mlp head: the head's training seconds;
- ``tlx sweep --grid head.type=linear,mlp`` warm with ``--jobs 1`` and ``--jobs 2``: wall seconds and
  each combination's selection seconds;
- in this tree, the k-fold selection of the linear head with its folds stacked and one by one.

    python bench/scale.py --shared ../shared/data --work /tmp/scale [--images 20000] [--before REV]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from trees import trees as source_trees

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "src" / "tlx" / "recipes" / "hymenoptera-lite0.yaml"


def build(shared: Path, root: Path, images: int) -> Path:
    """``root/{train,val}/{ants,bees,cats,dogs}``: about ``images`` variants of the shared photos."""
    from PIL import Image, ImageOps

    if (root / "done").is_file():
        return root
    sources = [
        (path, path.parent.name)
        for data in ("hymenoptera_data", "catsdogs")
        for path in sorted((shared / data).glob("*/*/*"))
        if path.suffix.lower() in (".jpg", ".jpeg", ".png")
    ]
    rng = random.Random(0)
    per_source = -(-images // len(sources))
    for n, (path, label) in enumerate(sources):
        split = "val" if n % 5 == 0 else "train"
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        for k in range(per_source):
            w, h = image.size
            scale = rng.uniform(0.85, 1.0)
            cw, ch = int(w * scale), int(h * scale)
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            variant = image.crop((left, top, left + cw, top + ch))
            if k % 2:
                variant = ImageOps.mirror(variant)
            variant.save(folder / f"{n:05d}-{k}.jpg", quality=rng.randint(85, 95))
    (root / "done").touch()
    return root


def tlx(src: Path, *args: object) -> float:
    """``python -m tlx ARGS`` with tlx from ``src``: its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "tlx", *map(str, args)], env=env, capture_output=True, text=True
    )
    if result.returncode:
        raise SystemExit(f"tlx {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return round(time.perf_counter() - started, 2)


def run_train_s(src: Path, data: Path, cache: Path, out: Path, head: str) -> float:
    tlx(src, "run", RECIPE, "--set", f"dataset.root={data}", "--set", f"head.type={head}",
        "--cache-dir", cache, "--out", out)  # fmt: skip
    return json.loads((out / "metrics.json").read_text())["seconds"]["train"]


def sweep(src: Path, data: Path, cache: Path, out: Path, jobs: int, epochs: int) -> dict:
    sets = ["--set", f"dataset.root={data}", "--set", f"train.epochs={epochs}"]
    wall = tlx(src, "sweep", RECIPE, *sets, "--grid", "head.type=linear,mlp", "--jobs", jobs,
               "--cache-dir", cache, "--out", out)  # fmt: skip
    with (out / "leaderboard.csv").open() as f:
        rows = {row["head.type"]: row for row in csv.DictReader(f)}
    return {"wall_s": wall, **{f"{head}_selection_s": float(rows[head]["selection_s"]) for head in rows}}


def stacking(data: Path, cache: Path, epochs: int) -> dict:
    """The linear head's 5-fold selection on the cached features, folds stacked and one by one."""
    from tlx import train
    from tlx.components import resolve
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.recipe import load_recipe

    recipe = load_recipe(RECIPE, (f"dataset.root={data}", f"train.epochs={epochs}"))
    parts = resolve(recipe, str(RECIPE))
    splits = parts.dataset.factory(parts.dataset_options)
    (features,) = FrozenBackbone.of(recipe, parts, cache).features([splits.train])
    classes = len(splits.classes)
    figures = {"rows": len(features.y)}
    stackable = train.stackable
    for label, stack in (("stacked", True), ("one_by_one", False)):
        train.stackable = stackable if stack else lambda *args: False
        make = lambda: parts.head.factory(features.x.shape[1], classes, parts.head_options)  # noqa: E731
        held = train.held_out(make(), make, features, recipe.train, n_classes=classes, seed=0)
        score = train.selection_score(held)
        figures[f"{label}_s"] = score["seconds"]
        figures[f"{label}_mean"] = score["mean"]
    train.stackable = stackable
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--before", help="an earlier commit to compare with")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sweep-epochs", type=int, default=5)
    args = parser.parse_args()
    work = args.work.resolve()
    data = build(args.shared.resolve(), work / f"data{args.images}", args.images)
    trees = source_trees(args.before, work)
    cache = work / "cache"
    cold = work / "cold"
    if not cold.is_dir():
        wall = tlx(
            REPO / "src", "run", RECIPE, "--set", f"dataset.root={data}", "--cache-dir", cache, "--out", cold
        )
        metrics = json.loads((cold / "metrics.json").read_text())
        print(json.dumps({"cold_run_s": wall, "images": metrics["n_train"] + metrics["n_test"],
                          "extract_s": metrics["seconds"]["extract"]}), flush=True)  # fmt: skip
    print(json.dumps({"stacking": stacking(data, cache, 20)}), flush=True)
    for k in range(args.rounds):
        for label, src in trees.items():
            out = work / f"{label}-{k}-{time.time_ns()}"
            figures = {"code": label, "round": k + 1}
            for head in ("linear", "mlp"):
                figures[f"run_{head}_train_s"] = run_train_s(src, data, cache, out / f"run-{head}", head)
            for jobs in (1, 2):
                result = sweep(src, data, cache, out / f"sweep-{jobs}", jobs, args.sweep_epochs)
                figures |= {f"sweep_jobs{jobs}_{key}": value for key, value in result.items()}
            print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
