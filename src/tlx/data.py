"""Datasets as lists of labelled image files, and the ImageFolder layout ``root/<split>/<class>/<image>``."""

from __future__ import annotations

import csv
import random
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tlx.errors import TlxError

#: torchvision's image extensions, plus GIF (decoded and converted to RGB like the rest)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)


@dataclass(frozen=True)
class Split:
    """One split: image paths with their class index."""

    name: str
    samples: list[tuple[Path, int]]
    #: files left out, with the reason, for the summary
    skipped: tuple[tuple[Path, str], ...] = ()

    def __len__(self) -> int:
        return len(self.samples)

    def class_counts(self, n_classes: int) -> list[int]:
        counts = [0] * n_classes
        for _, label in self.samples:
            counts[label] += 1
        return counts


@dataclass(frozen=True)
class Splits:
    """What a dataset plugin returns: class names and a train and a test split."""

    classes: list[str]
    train: Split
    test: Split
    source: str


def scan_imagefolder(root: Path, train: str, test: str) -> Splits:
    """Scan ``root/<train>`` and ``root/<test>``; classes are the sorted folder names of the train split."""
    if not root.is_dir():
        raise TlxError(f"dataset.root: folder {root} does not exist; set --set dataset.root=PATH")
    train_dir, test_dir = _split_dir(root, train, "train"), _split_dir(root, test, "test")
    classes = class_folders(train_dir, "dataset.train")
    extra = sorted(
        p.name
        for p in test_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in classes
    )
    if extra:
        raise TlxError(
            f"dataset.test: {test_dir} has class folder(s) {', '.join(extra)} that the train split "
            f"{train_dir} lacks; every test class needs training images"
        )
    return Splits(
        classes=classes,
        train=_scan_split(train_dir, classes, root),
        test=_scan_split(test_dir, classes, root),
        source=str(root),
    )


def class_folders(folder: Path, key: str) -> list[str]:
    """The sorted names of the class folders in ``folder``; at least two."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise TlxError(
            f"{key}: {folder} has {len(classes)} class folder(s); a classifier needs at "
            "least two (one folder per class)"
        )
    return classes


def scan_class_folder(root: Path, test_fraction: float, seed: int) -> Splits:
    """Scan ``root/<class>/<image>`` and split it, stratified by class and seeded, into train and test."""
    if not root.is_dir():
        raise TlxError(f"dataset.root: folder {root} does not exist; set --set dataset.root=PATH")
    classes = class_folders(root, "dataset.root")
    images = _scan_split(root, classes, root)
    train, test = stratified_split(images.samples, classes, test_fraction, seed, "dataset.root")
    return Splits(
        classes,
        Split("train", train, images.skipped),
        Split("test", test),
        source=f"{root} (test_fraction {test_fraction:g}, split_seed {seed})",
    )


def stratified_split(
    samples: list[tuple[Path, int]], classes: list[str], test_fraction: float, seed: int, key: str
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Hold out ``test_fraction`` of each class (rounded, at least one image) for testing.

    The same samples, fraction and seed always give the same split; each part keeps the input order.
    """
    rng = random.Random(seed)
    test_indices: set[int] = set()
    for label, name in enumerate(classes):
        members = [i for i, (_, y) in enumerate(samples) if y == label]
        if len(members) < 2:
            raise TlxError(
                f"{key}: class {name!r} has {len(members)} image(s); splitting needs at least two per "
                "class (one to train on, one to test)"
            )
        n_test = min(max(round(len(members) * test_fraction), 1), len(members) - 1)
        test_indices.update(rng.sample(members, n_test))
    train = [s for i, s in enumerate(samples) if i not in test_indices]
    test = [s for i, s in enumerate(samples) if i in test_indices]
    return train, test


def read_manifest(path: Path, key: str) -> list[tuple[Path, str]]:
    """Rows of a CSV manifest with a header ``path,label``; relative paths are taken from the CSV's folder."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            rows = [(reader.line_num, row) for row in reader]
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise TlxError(f"{key}: manifest {path} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TlxError(f"{key}: cannot read manifest {path} ({exc})") from None
    if not {"path", "label"} <= set(columns):
        raise TlxError(
            f"{key}: {path} has columns {', '.join(columns) or 'none'}; a manifest starts with the "
            "header line path,label"
        )
    entries = []
    for line, row in rows:
        file, label = (row["path"] or "").strip(), (row["label"] or "").strip()
        if not file or not label:
            raise TlxError(f"{key}: {path} line {line}: needs both a path and a label")
        image = path.parent / file
        if not image.is_file():
            raise TlxError(f"{key}: {path} line {line}: image {image} not found")
        entries.append((image, label))
    if not entries:
        raise TlxError(f"{key}: manifest {path} lists no images")
    return entries


def scan_manifests(train: Path, test: Path | None, test_fraction: float, seed: int) -> Splits:
    """Splits from a CSV manifest and a test manifest, or one manifest split by ``test_fraction``."""
    rows = read_manifest(train, "dataset.manifest")
    classes = sorted({label for _, label in rows})
    if len(classes) < 2:
        raise TlxError(f"dataset.manifest: {train} has {len(classes)} label(s); a classifier needs two")
    index = {name: k for k, name in enumerate(classes)}
    samples = [(image, index[label]) for image, label in rows]
    if test is None:
        train_samples, test_samples = stratified_split(
            samples, classes, test_fraction, seed, "dataset.manifest"
        )
        source = f"{train} (test_fraction {test_fraction:g}, split_seed {seed})"
    else:
        test_rows = read_manifest(test, "dataset.test_manifest")
        unknown = sorted({label for _, label in test_rows} - set(classes))
        if unknown:
            raise TlxError(
                f"dataset.test_manifest: {test} has label(s) {', '.join(unknown)} that {train} lacks; "
                "every test label needs training images"
            )
        train_samples, test_samples = samples, [(image, index[label]) for image, label in test_rows]
        source = f"{train}, {test}"
    return Splits(classes, Split("train", train_samples), Split("test", test_samples), source)


def _split_dir(root: Path, name: str, key: str) -> Path:
    path = root / name
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise TlxError(
            f"dataset.{key}: {root} has no split folder {name!r} (found: {', '.join(found) or 'none'}); "
            f"set --set dataset.{key}=NAME"
        )
    return path


def _scan_split(split_dir: Path, classes: list[str], root: Path) -> Split:
    samples: list[tuple[Path, int]] = []
    skipped: list[tuple[Path, str]] = []
    real_root = root.resolve()
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if not path.resolve().is_relative_to(real_root):
                skipped.append((path, "links outside the dataset root"))
            elif path.is_file():
                samples.append((path, label))
    if not samples:
        raise TlxError(
            f"dataset: split folder {split_dir} holds no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders"
        )
    return Split(split_dir.name, samples, tuple(skipped))


def download_and_unpack(url: str, root: Path, timeout: float = 10.0) -> None:
    """Download a zip archive and unpack it so that its top folder becomes ``root``."""
    from tqdm import tqdm

    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".tlx-download-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {url}") as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TlxError(
                f"dataset.url: cannot download {url} ({reason}); offline, pass "
                "--set dataset.root=PATH to a local copy of the dataset"
            ) from None
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile:
            raise TlxError(f"dataset.url: {url} is not a zip archive") from None
        tops = [p for p in unpacked.iterdir() if not p.name.startswith(("__MACOSX", "."))]
        shutil.move(str(tops[0] if len(tops) == 1 and tops[0].is_dir() else unpacked), root)
