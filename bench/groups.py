"""Issue 24's group figures: the selection score with and without ``dataset.group`` against the test
accuracy, on training images that come in groups of near copies.

Every catsdogs image becomes four overlapping corner crops (70% of each side) named
``<stem>__c<i>.jpg``, a group of four; the test split is the crops of the validation images, so that
test and selection score images of one kind. The Lite0 recipe (bundled ``hymenoptera-lite0``),
with its linear head and with ``mlp``, runs twice with its selection score (5-fold cross-validation on
the training features, what ``tlx sweep`` ranks by): without groups a crop's three siblings train the
head that scores it; with ``dataset.group`` they sit in its fold.

    python bench/groups.py --data ../shared/data/catsdogs [--work /tmp/tlx-groups] [--cache-dir DIR]

The crops are written once into ``--work`` and reused: the feature cache knows a file by its path and
stat, so a second invocation extracts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from tlx.data import IMAGE_EXTENSIONS, load_image
from tlx.recipe import load_recipe
from tlx.run import run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "src" / "tlx" / "recipes" / "hymenoptera-lite0.yaml"
#: the group id of a crop: its file name before ``__c<i>``
GROUP = r"^(.+)__c\d\.jpg$"
SIDE = 0.7
HEADS = ("linear", "mlp")


def write_crops(data: Path, root: Path) -> None:
    """``root/<split>/<class>/<stem>__c<i>.jpg``: four corner crops of every image of ``data``'s
    ``train`` and ``val`` splits; a split folder already there is kept."""
    for split in ("train", "val"):
        target = root / split
        if target.is_dir():
            continue
        partial = root / f".{split}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        for source in sorted((data / split).glob("*/*")):
            if source.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            image = load_image(source)
            w, h = image.size
            cw, ch = round(SIDE * w), round(SIDE * h)
            folder = partial / source.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            for i, (left, top) in enumerate(((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch))):
                crop = image.crop((left, top, left + cw, top + ch))
                crop.save(folder / f"{source.stem}__c{i}.jpg", quality=95)
        partial.rename(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="catsdogs: train/<class>/, val/<class>/")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlx-groups")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    crops = args.work / "crops"
    write_crops(args.data, crops)
    rows = []
    for head in HEADS:
        for name, extra in (("without groups", ()), ("dataset.group", (f"dataset.group={GROUP}",))):
            recipe = load_recipe(RECIPE, (f"dataset.root={crops}", f"head.type={head}", *extra))
            out = args.work / "runs" / f"{head}-{name.replace(' ', '-').replace('.', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            metrics = run(recipe, str(RECIPE), out, args.cache_dir, select=True)
            selection = metrics["selection"]
            rows.append((head, name, selection["mean"], selection["std"], metrics["test_accuracy"]))
    print(f"{metrics['n_train']} training crops, {metrics['n_test']} test crops")
    print("| head | selection by | selection score (5-fold CV) | test accuracy | selection − test |")
    print("| --- | --- | --- | --- | --- |")
    for head, name, mean, std, test in rows:
        gap = 100 * (mean - test)
        print(f"| {head} | {name} | {mean:.2%} ± {std:.2%} | {test:.2%} | {gap:+.2f} points |")


if __name__ == "__main__":
    main()
