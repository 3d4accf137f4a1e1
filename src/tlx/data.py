"""Datasets as lists of labelled image files, and the ImageFolder layout ``root/<split>/<class>/<image>``."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tlx.errors import TlxError
from tlx.files import sha256_of

if TYPE_CHECKING:
    from PIL import Image

#: torchvision's image extensions, plus GIF (decoded and converted to RGB like the rest)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)

#: how :func:`load_image` turns a file into pixels; part of the feature cache's namespace, so a change
#: here is a new namespace and no feature decoded the old way is reused
DECODING = "exif-transposed; 16-bit and 32-bit integer grey /257, float grey x255; then RGB"

#: a folder holding this file is a tlx run in progress (its lock), never a class folder of a dataset
RUN_MARKER = ".tlx-run.lock"

#: why a file outside the dataset root (a link, a manifest path with ``..`` or absolute) is left out
OUTSIDE_ROOT = "links outside the dataset root"


@dataclass(frozen=True)
class Split:
    """One split: image paths with their class index, and with ``dataset.group`` the group of each."""

    name: str
    samples: list[tuple[Path, int]]
    #: files left out, with the reason, for the summary
    skipped: tuple[tuple[Path, str], ...] = ()
    #: the group id of every sample, in order (images of one object: every split keeps them together)
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def part(self, indices: Iterable[int], name: str | None = None) -> Split:
        """The samples at ``indices`` with their groups, as split ``name`` (default: this split's)."""
        kept = list(indices)
        groups = tuple(self.groups[i] for i in kept) if self.groups is not None else None
        return Split(name or self.name, [self.samples[i] for i in kept], groups=groups)

    def decoded_groups(self, skipped: Iterable[tuple[Path, str]]) -> list[str] | None:
        """The groups of the samples that were decoded (all but ``skipped``): one per row of this
        split's features, as the selection's folds need them; None without groups."""
        if self.groups is None:
            return None
        left_out = {path for path, _ in skipped}
        return [g for (path, _), g in zip(self.samples, self.groups) if path not in left_out]

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
    #: the folders the dataset reads images from, for :func:`check_out_dir`
    roots: tuple[Path, ...] = ()

    def listing(self) -> dict[str, dict[str, Any]]:
        """What a run records of its data, to tell later whether the dataset changed: for the train and
        the test split, its number of images and a SHA-256 of each image's path, class, size and
        modification time."""
        return {"train": _listing(self.train, self.classes), "test": _listing(self.test, self.classes)}


def _listing(split: Split, classes: list[str]) -> dict[str, Any]:
    """``split``'s number of images and the SHA-256 of its listing (see :meth:`Splits.listing`)."""
    digest = hashlib.sha256()
    for path, label in split.samples:
        try:
            st = path.stat()
            stamp: list[int] | None = [st.st_size, st.st_mtime_ns]
        except OSError:  # gone since the scan: decoding reports it
            stamp = None
        digest.update(json.dumps([os.path.abspath(path), classes[label], stamp]).encode())
    return {"images": len(split), "sha256": digest.hexdigest()}


def load_image(source: Path | Image.Image) -> Image.Image:
    """The image in ``source`` as 8-bit RGB, upright: one decoder for extraction, fine-tuning and predict.

    ``source`` is a file, or an image already in memory (the Python API's classifier takes both),
    which is converted by the same rules as a file and left unchanged itself.

    The EXIF orientation is applied (cameras store portrait photos sideways with a tag). 16-bit and
    32-bit integer grey (Pillow's ``I;16*`` and ``I`` modes, 0-65535) and float grey (``F``, 0-1) are
    scaled to 0-255, which Pillow's ``convert("RGB")`` would clip to nearly white; values outside
    those ranges raise ``ValueError``. An image over Pillow's decompression-bomb warning limit raises
    ``DecompressionBombError``, as one over its hard limit does, instead of printing a warning.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return _upright_rgb(source.copy())
    with opened(source) as image:
        return _upright_rgb(image)


@contextlib.contextmanager
def opened(source: Path | BinaryIO) -> Iterator[Image.Image]:
    """``Image.open(source)`` where an image over Pillow's decompression-bomb *warning* limit raises
    ``DecompressionBombError`` within the block, as one over its hard limit does, instead of warning."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as image:
                yield image
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from None


def _upright_rgb(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation (in place), then as 8-bit RGB."""
    from PIL import ImageOps

    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        return _grey_to_8_bits(image)
    return image.convert("RGB")


def _grey_to_8_bits(image: Image.Image) -> Image.Image:
    """A high-bit-depth grey image as 8-bit RGB, its full range (0-65535, or 0-1 for floats) to 0-255."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" else 65535.0
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if not (low >= 0 and high <= top):  # NaN fails too
        raise ValueError(
            f"{image.mode} pixel values span {low:g}..{high:g}, outside 0..{top:g}; "
            "save the image with 8 or 16 bits per channel"
        )
    return Image.fromarray(np.rint(pixels * (255 / top)).astype(np.uint8)).convert("RGB")


def check_out_dir(splits: Splits, out: Path) -> None:
    """Refuse a run folder inside a folder the dataset reads: its figures would be scanned as images."""
    target = out.resolve()
    for root in splits.roots:
        if target.is_relative_to(root.resolve()):
            raise TlxError(
                f"--out: {out} is inside the dataset folder {root}; the run's images would become "
                "training images of the next run; choose a folder outside the dataset"
            )


def check_overlap(splits: Splits) -> list[str]:
    """Refuse an image file in both splits; warnings for repeated files and identical test images.

    The same file (through links too) in train and test is a TlxError: the head would be tested on
    images it trained on. Different files with the same bytes (SHA-256) are a warning, as is a file
    listed twice in one split; they may be deliberate. Only files whose size occurs in both splits
    are read and hashed: different sizes cannot hold the same bytes. A group (``dataset.group``) with
    images in both splits is a warning too.
    """
    (train, train_repeats), (test, test_repeats) = map(_files_by_identity, (splits.train, splits.test))
    both = [path for identity, (path, _) in test.items() if identity in train]
    if both:
        raise TlxError(
            f"dataset: {len(both)} image file(s) are in both split {splits.train.name!r} and split "
            f"{splits.test.name!r} (first: {both[0]}); testing on training images overstates the "
            "test accuracy; list each image in one split only"
        )
    messages = []
    for split, repeats in ((splits.train, train_repeats), (splits.test, test_repeats)):
        if repeats:
            messages.append(
                f"split {split.name!r} lists {repeats} image file(s) again; every listing counts as "
                "one more image in training and scoring; list each image once"
            )
    same = _same_content(train, test)
    if same:
        test_path, train_path = same[0]
        messages.append(
            f"{len(same)} image(s) of split {splits.test.name!r} have the same content as an image of "
            f"split {splits.train.name!r} (first: {test_path} and {train_path}); they overstate the "
            "test accuracy; remove the copies from one split"
        )
    if splits.train.groups is not None and splits.test.groups is not None:
        shared = sorted(set(splits.train.groups) & set(splits.test.groups))
        if shared:
            messages.append(
                f"{len(shared)} group(s) of dataset.group have images in both split "
                f"{splits.train.name!r} and split {splits.test.name!r} (first: {shared[0]!r}); they "
                "overstate the test accuracy; move each group's images into one split"
            )
    return messages


def shared_images(train: Split, test: Split) -> int:
    """How many image files of ``test`` are files of ``train`` (through links too) or hold the same
    bytes as one: images that a head trained on ``train`` has seen."""
    (train_files, _), (test_files, _) = map(_files_by_identity, (train, test))
    others = {identity: file for identity, file in test_files.items() if identity not in train_files}
    return len(test_files) - len(others) + len(_same_content(train_files, others))


def _files_by_identity(split: Split) -> tuple[dict[tuple[int, int], tuple[Path, int]], int]:
    """The distinct files of ``split`` by (device, inode), each with its path and size; and how many
    listings repeat a file listed before."""
    files: dict[tuple[int, int], tuple[Path, int]] = {}
    repeats = 0
    for path, _ in split.samples:
        with contextlib.suppress(OSError):  # gone since the scan: decoding reports it
            st = path.stat()
            repeats += (st.st_dev, st.st_ino) in files
            files.setdefault((st.st_dev, st.st_ino), (path, st.st_size))
    return files, repeats


def _same_content(
    train: dict[tuple[int, int], tuple[Path, int]], test: dict[tuple[int, int], tuple[Path, int]]
) -> list[tuple[Path, Path]]:
    """Pairs (test file, a train file with the same SHA-256), for the test files that have one."""
    by_size: dict[int, list[Path]] = {}
    for path, size in train.values():
        by_size.setdefault(size, []).append(path)
    digests: dict[Path, str | None] = {}

    def sha256(path: Path) -> str | None:
        if path not in digests:
            try:
                digests[path] = sha256_of(path)
            except OSError:
                digests[path] = None
        return digests[path]

    pairs = []
    for path, size in test.values():
        twins = {sha256(p): p for p in by_size.get(size, ())}
        digest = sha256(path) if twins else None
        if digest is not None and digest in twins:
            pairs.append((path, twins[digest]))
    return pairs


def scan_imagefolder(root: Path, train: str, test: str, group: re.Pattern[str] | None = None) -> Splits:
    """Scan ``root/<train>`` and ``root/<test>``; classes are the sorted folder names of the train split.

    ``group``: the pattern whose first capture group in a file name is the image's group
    (:func:`name_groups`)."""
    if not root.is_dir():
        raise TlxError(f"dataset.root: folder {root} does not exist; set --set dataset.root=PATH")
    train_dir, test_dir = _split_dir(root, train, "train"), _split_dir(root, test, "test")
    classes = class_folders(train_dir, "dataset.train")
    extra = sorted(p.name for p in _subfolders(test_dir) if p.name not in classes)
    if extra:
        raise TlxError(
            f"dataset.test: {test_dir} has class folder(s) {', '.join(extra)} that the train split "
            f"{train_dir} lacks; every test class needs training images"
        )
    return Splits(
        classes=classes,
        train=name_groups(_scan_split(train_dir, classes, root, every_class=True), group),
        test=name_groups(_scan_split(test_dir, classes, root, every_class=False), group),
        source=str(root),
        roots=(root,),
    )


def name_groups(split: Split, pattern: re.Pattern[str] | None) -> Split:
    """``split`` with the group of every image: the first capture group of ``pattern`` searched in its
    file name (not its folders). An image whose name does not match, or matches with an empty or no
    first group, is a group of its own (its path). Without ``pattern``, ``split`` as it is."""
    if pattern is None:
        return split
    groups = tuple(
        (match.group(1) if (match := pattern.search(path.name)) else None) or str(path)
        for path, _ in split.samples
    )
    return replace(split, groups=groups)


def _subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder`` that may be classes: not hidden, not a run folder being written."""
    return [
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not (p / RUN_MARKER).exists()
    ]


def class_folders(folder: Path, key: str) -> list[str]:
    """The sorted names of the class folders in ``folder``; at least two."""
    classes = sorted(p.name for p in _subfolders(folder))
    if len(classes) < 2:
        raise TlxError(
            f"{key}: {folder} has {len(classes)} class folder(s); a classifier needs at "
            "least two (one folder per class)"
        )
    return classes


def scan_class_folder(
    root: Path, test_fraction: float, seed: int, group: re.Pattern[str] | None = None
) -> Splits:
    """Scan ``root/<class>/<image>`` and split it, stratified by class and seeded, into train and test;
    ``group`` as for :func:`scan_imagefolder`, each group then on one side."""
    if not root.is_dir():
        raise TlxError(f"dataset.root: folder {root} does not exist; set --set dataset.root=PATH")
    classes = class_folders(root, "dataset.root")
    images = name_groups(_scan_split(root, classes, root, every_class=True), group)
    train, test = stratified_split(images, classes, test_fraction, seed, "dataset.root", "test")
    return Splits(
        classes,
        replace(train, name="train", skipped=images.skipped),
        test,
        source=f"{root} (test_fraction {test_fraction:g}, split_seed {seed})",
        roots=(root,),
    )


def stratified_split(
    split: Split, classes: list[str], fraction: float, seed: int, key: str, held_name: str
) -> tuple[Split, Split]:
    """(the rest, the part held out as split ``held_name``): ``fraction`` of each class, by ``seed``.

    Without groups, each class's share is rounded, at least one image and not all. With groups, the
    held-out part is one fold of :func:`held_out_groups`. The same split, fraction and seed always give
    the same parts; each keeps the input order.
    """
    labels = [y for _, y in split.samples]
    if split.groups is not None:
        held = held_out_groups(labels, split.groups, classes, fraction, seed, key)
    else:
        rng = random.Random(seed)
        held = set()
        for label, name in enumerate(classes):
            members = [i for i, y in enumerate(labels) if y == label]
            if len(members) < 2:
                raise TlxError(
                    f"{key}: class {name!r} has {len(members)} image(s); splitting needs at least two "
                    "per class (one to train on, one to test)"
                )
            n_held = min(max(round(len(members) * fraction), 1), len(members) - 1)
            held.update(rng.sample(members, n_held))
    rest = [i for i in range(len(labels)) if i not in held]
    return split.part(rest), split.part(sorted(held), held_name)


def held_out_groups(
    labels: Sequence[int], groups: Sequence[str], classes: Sequence[str], fraction: float, seed: int, key: str
) -> set[int]:
    """The indices held out: one of ``round(1 / fraction)`` stratified group folds (:func:`group_folds`;
    fewer where a class has fewer groups), so that every group lies on one side and each class's
    held-out share is about ``fraction``. Every class keeps images on the other side."""
    counts = groups_per_class(labels, groups, len(classes))
    for name, count in zip(classes, counts):
        if count < 2:
            raise TlxError(
                f"{key}: class {name!r} has images in {count} group(s) of dataset.group; holding out "
                "needs at least two groups per class (one to train on, one to hold out)"
            )
    folds = group_folds(labels, groups, min(max(round(1 / fraction), 2), *counts), seed)
    held = {i for i, fold in enumerate(folds) if fold == 0}
    for label, name in enumerate(classes):
        if all(i in held for i, y in enumerate(labels) if y == label):
            raise TlxError(
                f"{key}: {fraction:g} holds out every group of class {name!r}; lower it or add groups"
            )
    return held


def groups_per_class(labels: Sequence[int], groups: Sequence[str] | None, n_classes: int) -> list[int]:
    """How many images of each class there are; with ``groups``, how many groups hold one."""
    members: list[set[object]] = [set() for _ in range(n_classes)]
    for i, label in enumerate(labels):
        members[label].add(groups[i] if groups is not None else i)
    return [len(m) for m in members]


def group_folds(labels: Sequence[int], groups: Sequence[str], k: int, seed: int) -> list[int]:
    """A fold in ``0..k-1`` for every image, each group in one fold and every class spread evenly:
    scikit-learn's ``StratifiedGroupKFold``, shuffled by ``seed``. ``k`` is at most the number of
    groups of the smallest class."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.zeros(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[held] = fold
    return folds.tolist()


def read_manifest(
    path: Path, key: str, group: str | None = None, root: Path | None = None
) -> tuple[list[tuple[Path, str]], tuple[str, ...] | None, list[tuple[Path, str]]]:
    """Rows ``(image, label)`` of a CSV manifest with a header ``path,label``; the group of each row,
    from the column named ``group`` when the manifest has it (an empty cell: the image's own group,
    its path), else None; and the rows left out.

    Relative paths are taken from the dataset root, ``root`` or else the CSV's folder: a path that
    leads out of it (``..``, absolute, a link) is left out, as links out of an image folder are.
    """
    rows = []
    start = 1  # the line where the row being read begins: where an unclosed quote opened
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file, strict=True)
            columns = reader.fieldnames or []
            start = reader.line_num + 1
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
    except FileNotFoundError:
        raise TlxError(f"{key}: manifest {path} not found") from None
    except csv.Error as exc:
        problem = "a quoted field is never closed" if "end of data" in str(exc) else str(exc)
        raise TlxError(f"{key}: {path} line {start}: {problem}; fix the CSV quoting") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TlxError(f"{key}: cannot read manifest {path} ({exc})") from None
    if not {"path", "label"} <= set(columns):
        raise TlxError(
            f"{key}: {path} has columns {', '.join(columns) or 'none'}; a manifest starts with the "
            "header line path,label"
        )
    entries, skipped, groups = [], [], []
    base = path.parent if root is None else root
    inside = base.resolve()
    for line, row in rows:
        file, label = (row["path"] or "").strip(), (row["label"] or "").strip()
        if not file or not label:
            raise TlxError(f"{key}: {path} line {line}: needs both a path and a label")
        image = base / file
        if not image.resolve().is_relative_to(inside):
            skipped.append((image, OUTSIDE_ROOT))
        elif not image.is_file():
            raise TlxError(f"{key}: {path} line {line}: image {image} not found")
        else:
            entries.append((image, label))
            if group in columns:
                groups.append((row[group] or "").strip() or str(image))
    if not entries:
        outside = f" inside the dataset root {base} ({len(skipped)} lie outside it)" if skipped else ""
        raise TlxError(f"{key}: manifest {path} lists no images{outside}")
    return entries, tuple(groups) if group in columns else None, skipped


def scan_manifests(
    train: Path,
    test: Path | None,
    test_fraction: float,
    seed: int,
    group: str | None = None,
    root: Path | None = None,
) -> Splits:
    """Splits from a CSV manifest and a test manifest, or one manifest split by ``test_fraction``;
    image paths are relative to ``root``, else to each manifest's folder.

    ``group``: the column holding each image's group; ``train`` must have it, ``test`` may (to warn
    of a group in both splits). Split by ``test_fraction``, each group lies on one side.
    """
    rows, groups, skipped = read_manifest(train, "dataset.manifest", group, root)
    if group is not None and groups is None:
        raise TlxError(
            f"dataset.group: {train} has no column {group!r}; name the column that holds each "
            "image's group, or remove dataset.group"
        )
    classes = sorted({label for _, label in rows})
    if len(classes) < 2:
        raise TlxError(f"dataset.manifest: {train} has {len(classes)} label(s); a classifier needs two")
    index = {name: k for k, name in enumerate(classes)}
    samples = Split("train", [(image, index[label]) for image, label in rows], tuple(skipped), groups)
    if test is None:
        train_split, test_split = stratified_split(
            samples, classes, test_fraction, seed, "dataset.manifest", "test"
        )
        train_split = replace(train_split, skipped=samples.skipped)
        source = f"{train} (test_fraction {test_fraction:g}, split_seed {seed})"
    else:
        test_rows, test_groups, test_skipped = read_manifest(test, "dataset.test_manifest", group, root)
        unknown = sorted({label for _, label in test_rows} - set(classes))
        if unknown:
            raise TlxError(
                f"dataset.test_manifest: {test} has label(s) {', '.join(unknown)} that {train} lacks; "
                "every test label needs training images"
            )
        train_split = samples
        test_split = Split(
            "test", [(image, index[label]) for image, label in test_rows], tuple(test_skipped), test_groups
        )
        source = f"{train}, {test}"
    return Splits(
        classes,
        train_split,
        test_split,
        source,
        roots=(root,) if root is not None else tuple(dict.fromkeys(m.parent for m in (train, test) if m)),
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


def _scan_split(split_dir: Path, classes: list[str], root: Path, *, every_class: bool) -> Split:
    """The images under ``split_dir/<class>/``; with ``every_class``, a class without any is an error
    (the head would have a class it never saw trained)."""
    samples: list[tuple[Path, int]] = []
    skipped: list[tuple[Path, str]] = []
    real_root = root.resolve()
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        found = len(samples)
        for path in sorted(class_dir.rglob("*")):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if not path.resolve().is_relative_to(real_root):
                skipped.append((path, OUTSIDE_ROOT))
            elif path.is_file():
                samples.append((path, label))
        if every_class and found == len(samples):
            raise TlxError(
                f"dataset: class folder {class_dir} holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
    if not samples:
        raise TlxError(
            f"dataset: split folder {split_dir} holds no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders"
        )
    return Split(split_dir.name, samples, tuple(skipped))


def download_and_unpack(url: str, root: Path, timeout: float = 10.0) -> None:
    """Download a zip archive and unpack it so that its top folder becomes ``root``.

    Folders created for ``root`` are removed again when the download or the archive fails.
    """
    with _removed_on_failure(root.parent):
        _download_and_unpack(url, root, timeout)


@contextlib.contextmanager
def _removed_on_failure(folder: Path) -> Iterator[None]:
    """Create ``folder`` and its missing parents; remove those that are still empty if the block fails."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for created in missing:  # the deepest first
            with contextlib.suppress(OSError):
                created.rmdir()
        raise


def _download_and_unpack(url: str, root: Path, timeout: float) -> None:
    from tqdm import tqdm

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
            unpacked.mkdir()
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile:
            raise TlxError(f"dataset.url: {url} is not a zip archive") from None
        tops = [p for p in unpacked.iterdir() if not p.name.startswith(("__MACOSX", "."))]
        if not tops:
            raise TlxError(
                f"dataset.url: the zip archive {url} is empty; pass --set dataset.root=PATH to a "
                "local copy of the dataset"
            )
        shutil.move(str(tops[0] if len(tops) == 1 and tops[0].is_dir() else unpacked), root)
