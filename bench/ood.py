"""Issue 25: which out-of-distribution score tells "none of the classes" best, on cached features.

    python bench/ood.py --shared ../shared/data --work /tmp/oodbench

Trains the Lite0 recipe on ants/bees and on catsdogs (features cached in WORK/cache), then for each run
scores its own test images (known) and the other dataset's test images (unknown) with:

- knn-K: the mean cosine distance to the K nearest training features (leave-one-out on the training
  images for the threshold);
- mahalanobis: the smallest Mahalanobis distance to a class mean, one shared covariance (Ledoit-Wolf),
  fitted on the training features;
- energy: -logsumexp of the head's logits; msp: 1 - the largest softmax probability.

For each: AUROC (known vs unknown), and with the threshold accepting 95% of the training images
(held out where the score allows it), the share of own test images accepted and of the other's refused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

import tlx
from tlx.artifacts import load_run
from tlx.data import Split

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "src" / "tlx" / "recipes" / "hymenoptera-lite0.yaml"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn(train: np.ndarray, queries: np.ndarray, k: int, same: bool) -> np.ndarray:
    index = NearestNeighbors(n_neighbors=k + same).fit(unit(train))
    distances, _ = index.kneighbors(unit(queries))
    return (distances[:, int(same) :] ** 2 / 2).mean(axis=1)


def mahalanobis(train: np.ndarray, y: np.ndarray, queries: np.ndarray) -> np.ndarray:
    means = np.stack([train[y == c].mean(axis=0) for c in np.unique(y)])
    centred = train - means[y]
    precision = LedoitWolf().fit(centred).precision_
    d = [np.einsum("ij,jk,ik->i", queries - m, precision, queries - m) for m in means]
    return np.min(np.stack(d, axis=1), axis=1)


def features(run, root: Path, split: str):
    samples = [(p, 0) for p in sorted((root / split).rglob("*")) if p.is_file()]
    found = run.extract(Split(split, samples))
    return found.x.numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    cache = args.work / "cache"
    datasets = {"ants/bees": args.shared / "hymenoptera_data", "catsdogs": args.shared / "catsdogs"}
    runs = {}
    for name, root in datasets.items():
        folder = args.work / name.replace("/", "-")
        if not (folder / "metrics.json").exists():
            data = yaml.safe_load(RECIPE.read_text())
            data["dataset"] = {"kind": "imagefolder", "root": str(root.resolve())}
            tlx.fit(data, out=folder, cache_dir=cache)
        runs[name] = load_run(folder, cache_dir=cache)
    end_to_end(runs, datasets, args.work)
    for name, run in runs.items():
        other = next(n for n in datasets if n != name)
        train = run.extract(run.parts.dataset.factory(run.parts.dataset_options).train)
        x, y = train.x.numpy(), train.y.numpy()
        own = features(run, datasets[name], "val")
        alien = features(run, datasets[other], "val")
        with torch.inference_mode():
            logits = {
                k: run.head(torch.from_numpy(v)).numpy()
                for k, v in (("train", x), ("own", own), ("alien", alien))
            }
        scores = {}
        for k in (1, 5, 10):
            scores[f"knn-{k}"] = (knn(x, x, k, True), knn(x, own, k, False), knn(x, alien, k, False))
        scores["mahalanobis"] = tuple(mahalanobis(x, y, q) for q in (x, own, alien))
        energy = {k: -torch.logsumexp(torch.from_numpy(v), dim=1).numpy() for k, v in logits.items()}
        scores["energy"] = (energy["train"], energy["own"], energy["alien"])
        msp = {
            k: 1 - torch.softmax(torch.from_numpy(v), dim=1).max(dim=1).values.numpy()
            for k, v in logits.items()
        }
        scores["msp"] = (msp["train"], msp["own"], msp["alien"])
        print(
            f"{name} run ({len(x)} training images): "
            f"own val {len(own)} known, {other} val {len(alien)} unknown"
        )
        for method, (t, o, a) in scores.items():
            auroc = roc_auc_score(np.r_[np.zeros(len(o)), np.ones(len(a))], np.r_[o, a])
            shares = []
            for target in (0.95, 0.97, 0.99):
                threshold = np.quantile(t, target)
                shares.append(f"{target:.0%}: {(o <= threshold).mean():.3f}/{(a > threshold).mean():.3f}")
            print(f"  {method:12s} AUROC {auroc:.4f}; own known/{other} unknown at " + ", ".join(shares))


def end_to_end(runs: dict, datasets: dict, work: Path) -> None:
    """What tlx itself answers (``tlx.load(run)``): calibration from metrics.json, the share of own test
    images known and of the other's unknown, and prediction sets at coverage 0.9 on the own test split."""
    import json

    for name, run in runs.items():
        other = next(n for n in datasets if n != name)
        metrics = json.loads((run.folder / "metrics.json").read_text())
        c, o = metrics["calibration"], metrics["ood"]
        print(
            f"{name} run: T {c['temperature']:.3f}, ECE {c['ece_uncalibrated']:.4f} -> {c['ece']:.4f}, NLL "
            f"{c['nll_uncalibrated']:.4f} -> {c['nll']:.4f}, accuracy {metrics['test_accuracy']:.4f}, "
            f"threshold {o['threshold']:.4f}; run seconds {metrics['seconds']}"
        )
        classifier = tlx.load(run.folder, cache_dir=work / "cache")
        own_files = sorted(p for p in (datasets[name] / "val").rglob("*") if p.is_file())
        alien_files = sorted(p for p in (datasets[other] / "val").rglob("*") if p.is_file())
        own, _ = classifier.top_k(own_files, 1, coverage=0.9)
        alien, _ = classifier.top_k(alien_files, 1)  # the features are cached from here on
        t0 = time.perf_counter()
        classifier.top_k(alien_files, 1, reject=False)
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        classifier.top_k(alien_files, 1, coverage=0.9)
        added = (time.perf_counter() - t0 - plain) / len(alien_files)
        truth = [Path(r["path"]).parent.name for r in own]
        covered = sum(t in r["prediction_set"] for t, r in zip(truth, own)) / len(own)
        size = sum(len(r["prediction_set"]) for r in own) / len(own)
        known = sum(r["known"] for r in own) / len(own)
        unknown = sum(not r["known"] for r in alien) / len(alien)
        print(
            f"  own val known {known:.4f}, {other} val unknown {unknown:.4f}; coverage 0.9: "
            f"empirical {covered:.4f}, mean set size {size:.3f}; warm prediction "
            f"{1000 * plain / len(alien_files):.2f} ms per image, "
            f"'unknown' and sets add {1000 * added:.3f} ms"
        )
    warm = work / "warm-ants-bees"
    if not warm.exists():  # a second ants/bees run: its features all from the cache
        data = yaml.safe_load(RECIPE.read_text())
        data["dataset"] = {"kind": "imagefolder", "root": str(datasets["ants/bees"].resolve())}
        tlx.fit(data, out=warm, cache_dir=work / "cache")
    print(f"warm ants/bees run seconds: {json.loads((warm / 'metrics.json').read_text())['seconds']}")


if __name__ == "__main__":
    main()
