"""Issue 24's figures for ``tlx audit``: injected label noise, injected duplicates, the data as it is, speed.

    python bench/audit.py noise --data ../shared/data/catsdogs --work /tmp/auditbench [--seeds 5]
    python bench/audit.py duplicates --data ../shared/data/catsdogs --work /tmp/auditbench
    python bench/audit.py asis --data ../shared/data/catsdogs --work /tmp/auditbench
    python bench/audit.py speed --data /tmp/scale/data20000 --work /tmp/auditbench

- noise: 10% of the training labels flipped (a CSV manifest; seeded), for each seed: precision of the
  audit's first k rows (k = the number flipped), AUROC of ``label_quality``, the same for ranking by
  in-sample loss (fastai's top losses: the trained head's loss on its own training images), and the test
  accuracy trained on the clean data, the noisy data and the audit's ``clean.yaml``.
- duplicates: 20 test images copied into the training split as they are, 20 more as three variants each
  (JPEG quality 50, scaled 0.6×, a 90% centre crop); recall and precision of the pairs found, by
  threshold, from one audit at a low threshold.
- asis: the audit of the dataset unchanged: counts and the worst few of each kind.
- speed: a cold and a warm audit; features computed, seconds.

Every audit uses the EfficientNet-Lite0 recipe (offline weights) with its linear head.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

import tlx
from tlx.files import sha256_of

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "src" / "tlx" / "recipes" / "hymenoptera-lite0.yaml"
VARIANTS = ("q50", "scaled", "cropped")


def recipe(dataset: dict) -> dict:
    data = yaml.safe_load(RECIPE.read_text())
    data["dataset"] = dataset
    return data


def listing(root: Path, split: str) -> list[tuple[Path, str]]:
    return [
        (path, folder.name)
        for folder in sorted((root / split).iterdir())
        if folder.is_dir()
        for path in sorted(folder.iterdir())
        if path.is_file()
    ]


def write_manifest(path: Path, rows: list[tuple[Path, str]], root: Path) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label"])
        writer.writerows((str(p.relative_to(root)), label) for p, label in rows)
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def precision_at_k(ranked: list[str], flipped: set[str]) -> float:
    k = len(flipped)
    return len(set(ranked[:k]) & flipped) / k


def noise(data: Path, work: Path, seeds: int, cache: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    train, test = listing(data, "train"), listing(data, "val")
    classes = sorted({label for _, label in train})
    test_csv = write_manifest(work / "test.csv", test, data)
    clean_csv = write_manifest(work / "train.csv", train, data)
    dataset = {"kind": "csv", "manifest": str(clean_csv), "test_manifest": str(test_csv), "root": str(data)}
    base = tlx.fit(recipe(dataset), out=work / "clean-run", cache_dir=cache).metrics["test_accuracy"]
    print(f"{data.name}: {len(train)} training images; trained on the true labels {base:.2%}")
    results = []
    for seed in range(seeds):
        rng = random.Random(seed)
        chosen = set(rng.sample(range(len(train)), round(0.1 * len(train))))
        noisy = [
            (p, rng.choice([c for c in classes if c != label]) if i in chosen else label)
            for i, (p, label) in enumerate(train)
        ]
        flipped = {str(train[i][0]) for i in chosen}
        manifest = write_manifest(work / f"noisy-{seed}.csv", noisy, data)
        noisy_set = {**dataset, "manifest": str(manifest)}
        folder = work / f"audit-{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        found = tlx.audit(recipe(noisy_set), out=folder, cache_dir=cache)
        ranked = [r["path"] for r in rows(folder / "label_issues.csv")]
        quality = {r["path"]: float(r["label_quality"]) for r in rows(folder / "label_issues.csv")}
        paths = [str(p) for p, _ in train]
        truth = [p in flipped for p in paths]
        run = tlx.fit(recipe(noisy_set), out=work / f"noisy-run-{seed}", cache_dir=cache)
        probabilities = run.load().predict_proba(paths)
        given = [classes.index(label) for _, label in noisy]
        loss = -np.log(np.maximum(probabilities[np.arange(len(paths)), given], 1e-12))
        by_loss = [paths[i] for i in np.argsort(-loss, kind="stable")]
        cleaned = tlx.fit(folder / "clean.yaml", out=work / f"cleaned-run-{seed}", cache_dir=cache)
        flagged = {r["path"] for r in rows(folder / "label_issues.csv") if r["flagged"] == "True"}
        result = {
            "seed": seed,
            "flipped": len(flipped),
            "flagged": len(flagged),
            "flagged_precision": len(flagged & flipped) / max(1, len(flagged)),
            "flagged_recall": len(flagged & flipped) / len(flipped),
            "audit_precision_at_k": precision_at_k(ranked, flipped),
            "audit_auroc": roc_auc_score(truth, [-quality[p] for p in paths]),
            "loss_precision_at_k": precision_at_k(by_loss, flipped),
            "loss_auroc": roc_auc_score(truth, loss),
            "accuracy_noisy": run.metrics["test_accuracy"],
            "accuracy_cleaned": cleaned.metrics["test_accuracy"],
            "audit_seconds": found.summary["seconds"],
        }
        cost = base - result["accuracy_noisy"]
        result["recovered"] = (
            (result["accuracy_cleaned"] - result["accuracy_noisy"]) / cost if cost > 0 else None
        )
        results.append(result)
        print(json.dumps(result))
    for key in (
        "audit_precision_at_k",
        "audit_auroc",
        "loss_precision_at_k",
        "loss_auroc",
        "flagged_precision",
        "flagged_recall",
        "accuracy_noisy",
        "accuracy_cleaned",
    ):
        values = [r[key] for r in results]
        print(
            f"  {key:22s} mean {statistics.fmean(values):.4f}  min {min(values):.4f}  max {max(values):.4f}"
        )
    print(f"  trained on the true labels {base:.4f}")


def variant(source: Path, kind: str, target: Path) -> None:
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        if kind == "scaled":
            image = image.resize(
                (round(image.width * 0.6), round(image.height * 0.6)), Image.Resampling.BICUBIC
            )
        elif kind == "cropped":
            dx, dy = round(image.width * 0.05), round(image.height * 0.05)
            image = image.crop((dx, dy, image.width - dx, image.height - dy))
        image.save(target, quality=50 if kind == "q50" else 90)


def duplicates(data: Path, work: Path, cache: Path) -> None:
    root = work / f"{data.name}-dups"
    test = listing(data, "val")
    rng = random.Random(0)
    picked = rng.sample(test, 40)
    exact, near = picked[:20], picked[20:]
    origin: dict[str, str] = {}
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(data, root)
    for i, (path, label) in enumerate(exact):
        target = root / "train" / label / f"inj-exact-{i}{path.suffix}"
        if not target.exists():
            shutil.copy(path, target)
        origin[str(target)] = str(root / "val" / label / path.name)
    for i, (path, label) in enumerate(near):
        for kind in VARIANTS:
            target = root / "train" / label / f"inj-{kind}-{i}.jpg"
            if not target.exists():
                variant(path, kind, target)
            origin[str(target)] = str(root / "val" / label / path.name)
    (root / "done").touch()
    folder = work / f"{data.name}-dups-audit"
    shutil.rmtree(folder, ignore_errors=True)
    dataset = {"kind": "imagefolder", "root": str(root)}
    found = tlx.audit(recipe(dataset), out=folder, cache_dir=cache, near_threshold=0.5)
    pairs = rows(folder / "duplicates.csv")

    hashes: dict[str, str] = {}

    def source_of(path: str) -> str:
        """The bytes an image was made from: its source's, for an injected one (a source may have
        copies of its own in the dataset: catsdogs has)."""
        source = origin.get(path, path)
        if source not in hashes:
            hashes[source] = sha256_of(Path(source))
        return hashes[source]

    exact_found = {p["path_a"] for p in pairs if p["kind"] == "exact" and "inj-exact" in p["path_a"]}
    print(
        f"{data.name}: exact copies found {len(exact_found)} of {len(exact)}; "
        f"audit {found.summary['seconds']} s"
    )
    injected = [t for t in origin if "inj-exact" not in t]
    for threshold in (0.80, 0.82, 0.84, 0.85, 0.86, 0.88, 0.90, 0.92):
        kept = [p for p in pairs if p["kind"] == "near" and float(p["similarity"]) >= threshold]
        touching = [p for p in kept if p["path_a"] in origin or p["path_b"] in origin]
        right = [p for p in touching if source_of(p["path_a"]) == source_of(p["path_b"])]
        recalled = {t for t in injected if any(p["path_a"] == t and p["path_b"] == origin[t] for p in right)}
        per_kind = {k: sum(f"inj-{k}-" in t for t in recalled) for k in VARIANTS}
        others = [p for p in kept if p["path_a"] not in origin and p["path_b"] not in origin]
        print(
            f"  threshold {threshold:.2f}: near recall {len(recalled) / len(injected):.3f} {per_kind}, "
            f"precision {len(right) / max(1, len(touching)):.3f} ({len(touching)} pairs touch an injected "
            f"image), other near pairs {len(others)}"
        )


def asis(data: Path, work: Path, cache: Path) -> None:
    folder = work / f"{data.name}-asis"
    shutil.rmtree(folder, ignore_errors=True)
    found = tlx.audit(recipe({"kind": "imagefolder", "root": str(data)}), out=folder, cache_dir=cache)
    print(json.dumps(found.summary, indent=1))
    for name, key in (("label_issues.csv", "flagged"), ("outliers.csv", "flagged")):
        print(name, [r for r in rows(folder / name) if r[key] == "True"][:10])
    print("duplicates.csv", rows(folder / "duplicates.csv")[:20])
    print(f"page: {folder / 'index.html'}")


def speed(data: Path, work: Path, cache: Path) -> None:
    dataset = {"kind": "imagefolder", "root": str(data)}
    for name in ("first", "warm"):
        folder = work / f"{data.name}-speed-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        found = tlx.audit(recipe(dataset), out=folder, cache_dir=cache)
        images = found.summary["images"]
        print(
            f"{data.name} {name}: {time.perf_counter() - started:.1f} s wall, {images['train']} + "
            f"{images['test']} images, features {found.summary['features']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["noise", "duplicates", "asis", "speed"])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default: WORK/cache)")
    args = parser.parse_args()
    cache = args.cache_dir or args.work / "cache"
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    if args.what == "noise":
        noise(data, args.work / f"{data.name}-noise", args.seeds, cache)
    elif args.what == "duplicates":
        duplicates(data, args.work, cache)
    elif args.what == "asis":
        asis(data, args.work, cache)
    else:
        speed(data, args.work, cache)


if __name__ == "__main__":
    main()
