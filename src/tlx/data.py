"""Datasets as lists of labelled image files, and the ImageFolder layout ``root/<split>/<class>/<image>``."""

from __future__ import annotations

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
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise TlxError(
            f"dataset.train: {train_dir} has {len(classes)} class folder(s); a classifier needs at "
            "least two (one folder per class)"
        )
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
