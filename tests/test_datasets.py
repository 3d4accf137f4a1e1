"""Dataset kinds: one folder split stratified and seeded, CSV manifests, groups of images of one object,
and the class balance summary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

import tlx
from tlx.data import Split, Splits, check_overlap, scan_class_folder, scan_imagefolder, scan_manifests
from tlx.default_plugins.datasets import ImageFolderOptions, imagefolder
from tlx.errors import TlxError
from tlx.recipe import load_recipe
from tlx.report import describe_balance
from tlx.run import run

from .conftest import GROUPED, make_grouped_folder, recipe_for, write_recipe


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
        (f"{{kind: csv, manifest: {manifest}, rot: x}}", r"unknown key dataset.rot; did you mean "),
    ):  # fmt: skip
        path = write_recipe(tmp_path / "r.yaml", f"dataset: {dataset}\nbackbone: {{name: counting}}\n")
        with pytest.raises(TlxError, match=message):
            run(load_recipe(path), "r.yaml", tmp_path / "out")


@pytest.mark.usefixtures("counting_backbone")
def test_a_run_on_two_manifests_under_another_root_loads_and_predicts(tmp_path: Path, images: Path) -> None:
    """The manifests live elsewhere (an audit folder); ``root`` says where the images are. The run
    folder's recipe.yaml holds every default (test_fraction too): it must load again."""
    elsewhere = tmp_path / "audit"
    train = write_manifest(elsewhere / "clean.csv", [(f"images/{i}.png", str(i % 2)) for i in range(8)])
    test = write_manifest(elsewhere / "test.csv", [("images/8.png", "0"), ("images/9.png", "1")])
    dataset = f"{{kind: csv, manifest: {train}, test_manifest: {test}, root: {images}}}"
    path = write_recipe(tmp_path / "r.yaml", f"dataset: {dataset}\nbackbone: {{name: counting}}\n")
    metrics = run(load_recipe(path), "r.yaml", tmp_path / "out")
    assert (metrics["n_train"], metrics["n_test"]) == (8, 2)
    assert len(tlx.load(tmp_path / "out").predict(images / "images" / "9.png")) == 1
    outside = write_manifest(elsewhere / "out.csv", [("../audit/clean.csv", "0"), ("../audit/test.csv", "1")])
    with pytest.raises(TlxError, match=r"out.csv lists no images inside the dataset root"):
        scan_manifests(outside, None, 0.2, 0, root=images)


def groups_by_name(split: Split) -> dict[str, str]:
    assert split.groups is not None
    return dict(zip((path.name for path, _ in split.samples), split.groups, strict=True))


def test_groups_come_from_the_file_names(tmp_path: Path) -> None:
    make_grouped_folder(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_grouped_folder(tmp_path / "d" / "val", {"a": 1, "b": 1}, prefix="t")
    loose = tmp_path / "d" / "train" / "a" / "loose.png"
    Image.new("RGB", (24, 24)).save(loose)
    splits = imagefolder(ImageFolderOptions(root=tmp_path / "d", group=GROUPED))
    train = groups_by_name(splits.train)
    assert train["a0_0.png"] == train["a0_2.png"] == "a0" and train["b1_1.png"] == "b1"
    assert train["loose.png"] == str(loose)  # no match: a group of its own
    assert set(groups_by_name(splits.test).values()) == {"ta0", "tb0"}
    assert imagefolder(ImageFolderOptions(root=tmp_path / "d")).train.groups is None


def test_groups_come_from_a_manifest_column(images: Path) -> None:
    lines = [
        "path,label,object",
        *(f"images/{i}.png,{i % 2},obj{i // 4}" for i in range(9)),
        "images/9.png,1,",
    ]
    (images / "all.csv").write_text("\n".join(lines) + "\n")
    splits = scan_manifests(images / "all.csv", None, 0.2, 0, group="object")
    groups = {**groups_by_name(splits.train), **groups_by_name(splits.test)}
    assert [groups[f"{i}.png"] for i in range(9)] == ["obj0"] * 4 + ["obj1"] * 4 + ["obj2"]
    assert groups["9.png"] == str(images / "images/9.png")  # an empty cell: a group of its own
    with pytest.raises(TlxError, match=r"^dataset.group: .*all.csv has no column 'photo'; name the column"):
        scan_manifests(images / "all.csv", None, 0.2, 0, group="photo")


@pytest.mark.usefixtures("counting_backbone")
@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(a", r"dataset.group: not a regular expression \(missing \), unterminated subpattern"),
        (r"_\d+", r"dataset.group: the regular expression has no capture group; wrap the part"),
    ],
)
def test_a_bad_group_pattern_is_a_one_line_error(tmp_path: Path, pattern: str, message: str) -> None:
    root = make_grouped_folder(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(TlxError, match=message) as caught:
        run(
            recipe_for(tmp_path, root, "dataset.kind=folder", f"dataset.group={pattern}"), "r", tmp_path / "o"
        )
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folder_split_keeps_each_group_on_one_side(tmp_path: Path, seed: int) -> None:
    root = make_grouped_folder(tmp_path / "d", {"a": 8, "b": 6})
    splits = scan_class_folder(root, 0.25, seed, re.compile(GROUPED))
    train, test = groups_by_name(splits.train), groups_by_name(splits.test)
    assert not set(train.values()) & set(test.values())
    assert len(train) + len(test) == 42 and splits.test.class_counts(2)[0] and splits.test.class_counts(2)[1]
    assert all(splits.train.class_counts(2))
    objects = {name.split("_")[0] for name in test}
    ungrouped = {p.name.split("_")[0] for p, _ in scan_class_folder(root, 0.25, seed).test.samples}
    assert len(ungrouped) > len(objects)  # without groups, an object's photos land on both sides


def test_a_group_in_both_splits_is_a_warning(tmp_path: Path) -> None:
    make_grouped_folder(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_grouped_folder(tmp_path / "d" / "val", {"a": 1, "b": 1}, photos=1)  # photo 0 of a0, b0 again
    for val in (tmp_path / "d" / "val").rglob("*.png"):
        Image.new("RGB", (30, 30), (1, 2, 3)).save(val)  # other bytes: not the same files
    warnings = check_overlap(scan_imagefolder(tmp_path / "d", "train", "val", re.compile(GROUPED)))
    assert warnings == [
        "2 group(s) of dataset.group have images in both split 'train' and split 'val' (first: 'a0'); "
        "they overstate the test accuracy; move each group's images into one split"
    ]


@pytest.mark.usefixtures("counting_backbone")
def test_selection_folds_follow_the_groups_of_the_decoded_images(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_grouped_folder(root / "train", {"a": 6, "b": 6})
    make_grouped_folder(root / "val", {"a": 1, "b": 1}, prefix="t")
    (root / "train" / "a" / "a0_7.png").write_bytes(b"not an image")  # skipped: the groups must follow
    recipe = recipe_for(tmp_path, root, f"dataset.group={GROUPED}", "train.epochs=2")
    metrics = run(recipe, "r.yaml", tmp_path / "out", select=True)
    assert metrics["n_train"] == 36 and [s["path"] for s in metrics["skipped"]] == [
        str(root / "train/a/a0_7.png")
    ]
    assert metrics["selection"]["selected_by"] == (
        "5-fold cross-validation on the training split, each group (dataset.group) in one fold"
    )
