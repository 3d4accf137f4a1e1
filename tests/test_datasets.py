"""Dataset kinds: one folder split stratified and seeded, CSV manifests, and the class balance summary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from tlx.data import Split, Splits, scan_class_folder, scan_manifests
from tlx.errors import TlxError
from tlx.recipe import load_recipe
from tlx.report import describe_balance
from tlx.run import run

from .conftest import write_recipe


def class_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40, 40), (10 * i % 256, 100, 50)).save(root / name / f"{i}.png")
    return root


def test_folder_is_split_per_class_by_the_fraction(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "d", {"cat": 10, "dog": 5, "eel": 2})
    splits = scan_class_folder(root, test_fraction=0.2, seed=0)
    assert splits.classes == ["cat", "dog", "eel"]
    # round(10·0.2)=2, round(5·0.2)=1, and at least one but not every image of a class
    assert splits.test.class_counts(3) == [2, 1, 1]
    assert splits.train.class_counts(3) == [8, 4, 1]
    train, test = {p for p, _ in splits.train.samples}, {p for p, _ in splits.test.samples}
    assert not train & test and len(train | test) == 17
    assert all(p.parent.name == splits.classes[y] for p, y in splits.train.samples + splits.test.samples)


def test_folder_split_depends_on_the_seed_only(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "d", {"a": 20, "b": 20})

    def test_files(seed: int) -> list[Path]:
        return [p for p, _ in scan_class_folder(root, 0.25, seed).test.samples]

    assert test_files(3) == test_files(3)
    assert test_files(3) != test_files(4)
    assert len(test_files(4)) == 10


def test_folder_needs_two_images_per_class(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "d", {"a": 4, "b": 1})
    with pytest.raises(
        TlxError, match=r"dataset.root: class 'b' has 1 image\(s\); splitting needs at least two"
    ):
        scan_class_folder(root, 0.2, 0)


def write_manifest(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(f"{p},{label}" for p, label in rows)]) + "\n")
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp/data/images/{0..9}.png next to the manifests in tmp/data/."""
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (32, 32), (25 * i, 0, 0)).save(folder / f"{i}.png")
    return folder.parent


def test_manifest_paths_are_relative_to_the_csv(images: Path) -> None:
    train = write_manifest(
        images / "train.csv", [(f"images/{i}.png", "zebra" if i < 4 else "ant") for i in range(8)]
    )
    test = write_manifest(images / "test.csv", [("images/8.png", "ant"), ("images/9.png", "zebra")])
    splits = scan_manifests(train, test, test_fraction=0.2, seed=0)
    assert splits.classes == ["ant", "zebra"]
    assert splits.train.samples[0] == (images / "images/0.png", 1)
    assert splits.train.class_counts(2) == [4, 4]
    assert splits.test.samples == [(images / "images/8.png", 0), (images / "images/9.png", 1)]


def test_one_manifest_is_split_by_test_fraction(images: Path) -> None:
    rows = [(f"images/{i}.png", "odd" if i % 2 else "even") for i in range(10)]
    splits = scan_manifests(write_manifest(images / "all.csv", rows), None, test_fraction=0.4, seed=1)
    assert splits.test.class_counts(2) == [2, 2] and splits.train.class_counts(2) == [3, 3]


def test_manifest_problems_name_the_file_and_line(images: Path) -> None:
    bad_header = write_manifest(images / "a.csv", [("images/0.png", "x")], header="file,class")
    with pytest.raises(
        TlxError, match=r"dataset.manifest: .*a.csv has columns file, class; .*header line path,label"
    ):
        scan_manifests(bad_header, None, 0.2, 0)
    missing = write_manifest(images / "b.csv", [("images/0.png", "x"), ("images/nope.png", "y")])
    with pytest.raises(TlxError, match=r"b.csv line 3: image .*images/nope.png not found"):
        scan_manifests(missing, None, 0.2, 0)
    train = write_manifest(images / "c.csv", [("images/0.png", "x"), ("images/1.png", "y")])
    test = write_manifest(images / "d.csv", [("images/2.png", "w")])
    with pytest.raises(TlxError, match=r"dataset.test_manifest: .*d.csv has label\(s\) w that .*c.csv lacks"):
        scan_manifests(train, test, 0.2, 0)
    with pytest.raises(TlxError, match=r"dataset.manifest: manifest .*absent.csv not found"):
        scan_manifests(images / "absent.csv", None, 0.2, 0)


def test_balance_line_gives_the_ratio_and_the_majority_baseline() -> None:
    def split(name: str, labels: list[int]) -> Split:
        return Split(name, [(Path(f"{i}.png"), y) for i, y in enumerate(labels)])

    splits = Splits(["a", "b"], split("train", [0] * 30 + [1] * 10), split("val", [0] * 3 + [1] * 7), "src")
    assert describe_balance(splits) == (
        "balance: largest/smallest training class 3.00x; always answering 'a' scores 30.00% on val"
    )


@pytest.mark.usefixtures("counting_backbone")
def test_both_kinds_run_end_to_end(tmp_path: Path, images: Path, capsys) -> None:
    root = class_folder(tmp_path / "folder", {"x": 5, "y": 5})
    manifest = write_manifest(images / "all.csv", [(f"images/{i}.png", str(i % 2)) for i in range(10)])
    for out, dataset in (
        ("f", f"{{kind: folder, root: {root}, test_fraction: 0.4}}"),
        ("c", f"{{kind: csv, manifest: {manifest}, split_seed: 2}}"),
    ):
        path = write_recipe(
            tmp_path / "r.yaml",
            f"dataset: {dataset}\nbackbone: {{name: counting}}\nextract: {{workers: 0}}\n",
        )
        metrics = run(load_recipe(path, ("train.epochs=2",)), "r.yaml", tmp_path / out)
        assert metrics["n_train"] + metrics["n_test"] == 10
    summary = capsys.readouterr().out
    assert re.search(r"train\s+6\s+3\s+3\n\s+test\s+4\s+2\s+2", summary)
    assert "balance: largest/smallest training class 1.00x" in summary


@pytest.mark.usefixtures("counting_backbone")
def test_kind_options_are_validated(tmp_path: Path, images: Path) -> None:
    manifest = write_manifest(images / "all.csv", [(f"images/{i}.png", str(i % 2)) for i in range(10)])
    for dataset, message in (
        ("{kind: folder, root: x, test_fraction: 1.5}", r"dataset.test_fraction: .*less than 1"),
        (f"{{kind: csv, manifest: {manifest}, test_manifest: {manifest}, test_fraction: 0.3}}",
         r"dataset: test_fraction split manifest when there is no test_manifest"),
        (f"{{kind: csv, manifest: {manifest}, root: x}}", r"unknown key dataset.root"),
    ):  # fmt: skip
        path = write_recipe(tmp_path / "r.yaml", f"dataset: {dataset}\nbackbone: {{name: counting}}\n")
        with pytest.raises(TlxError, match=message):
            run(load_recipe(path), "r.yaml", tmp_path / "out")
