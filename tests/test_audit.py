"""``tlx audit`` on real photos: flipped labels, copies of test images in train, an off-topic image."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from PIL import Image

import tlx
from tlx import findings
from tlx.recipe import BUNDLED, load_recipe

from .conftest import REPO, assert_user_error

HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
LITE0 = BUNDLED / "hymenoptera-lite0.yaml"


def photos(split: str, name: str) -> list[Path]:
    return sorted(p for p in (HYMENOPTERA / split / name).iterdir() if p.suffix == ".jpg")


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """20 ants and 20 bees to train on (3 bees filed as ants, a copy and a re-encoded copy of two test
    images, the dataset's GIF placeholder), 8 of each to test on."""
    root = tmp_path_factory.mktemp("messy") / "data"
    for split, count in (("train", 20), ("val", 8)):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for path in photos(split, name)[:count]:
                shutil.copy(path, root / split / name / path.name)
    flipped = []
    for path in photos("train", "bees")[20:23]:
        shutil.copy(path, root / "train" / "ants" / path.name)
        flipped.append(root / "train" / "ants" / path.name)
    exact = root / "train" / "ants" / "copy.jpg"
    shutil.copy(root / "val" / "ants" / photos("val", "ants")[0].name, exact)
    near = root / "train" / "bees" / "resaved.jpg"
    with Image.open(root / "val" / "bees" / photos("val", "bees")[1].name) as image:
        image.resize((int(image.width * 0.6), int(image.height * 0.6))).save(near, quality=50)
    resaved = root / "train" / "bees" / "lossless.png"  # another file, the same decoded pixels
    with Image.open(root / "val" / "bees" / photos("val", "bees")[2].name) as image:
        image.save(resaved)
    shutil.copy(HYMENOPTERA / "train" / "ants" / "imageNotFound.gif", root / "train" / "ants")
    return {
        "root": root,
        "flipped": flipped,
        "exact": exact,
        "near": near,
        "resaved": resaved,
        "cache": root.parent / "cache",
    }


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def audited(messy: dict, tmp_path_factory: pytest.TempPathFactory) -> tlx.Audit:
    out = tmp_path_factory.mktemp("audit") / "out"
    return tlx.audit(LITE0, [f"dataset.root={messy['root']}"], out=out, cache_dir=messy["cache"])


def test_flipped_labels_rank_first_and_are_flagged(messy: dict, audited: tlx.Audit) -> None:
    labels = rows(audited.folder / "label_issues.csv")
    assert len(labels) == 20 + 20 + 3 + 3 + 1  # every training image
    quality = [float(r["label_quality"]) for r in labels]
    assert quality == sorted(quality)
    worst = {Path(r["path"]): r for r in labels[:5]}  # 40 images: a real ant or two may look like bees
    assert set(messy["flipped"]) <= set(worst)
    assert all(
        worst[p]["flagged"] == "True" and worst[p]["suggested_label"] == "bees" for p in messy["flipped"]
    )
    assert audited.summary["label_issues"]["flagged"] == sum(r["flagged"] == "True" for r in labels)


def test_copies_of_test_images_are_leakage_and_left_out_of_the_clean_manifest(
    messy: dict, audited: tlx.Audit
) -> None:
    pairs = {(Path(r["path_a"]), r["kind"]): r for r in rows(audited.folder / "duplicates.csv")}
    exact = pairs[(messy["exact"], "exact")]
    assert (exact["split_a"], exact["split_b"]) == ("train", "val")
    assert Path(exact["path_b"]).name == photos("val", "ants")[0].name
    lossless = pairs[(messy["resaved"], "exact")]
    assert (lossless["split_b"], Path(lossless["path_b"]).name) == ("val", photos("val", "bees")[2].name)
    near = pairs[(messy["near"], "near")]
    assert (near["split_a"], near["split_b"], Path(near["path_b"]).name) == (
        "train",
        "val",
        photos("val", "bees")[1].name,
    )
    assert audited.summary["duplicates"]["leakage"] >= 3
    clean = {r["path"] for r in rows(audited.folder / "clean.csv")}
    for path in (messy["exact"], messy["near"], messy["resaved"], *messy["flipped"]):
        assert str(path.relative_to(messy["root"])) not in clean
    assert len(rows(audited.folder / "test.csv")) == 16


def test_the_placeholder_gif_is_the_worst_outlier(audited: tlx.Audit) -> None:
    outliers = rows(audited.folder / "outliers.csv")
    assert Path(outliers[0]["path"]).name == "imageNotFound.gif"
    assert outliers[0]["flagged"] == "True"
    assert len(outliers) == 47 + 16


def test_the_clean_recipe_runs_on_the_clean_manifests(
    messy: dict, audited: tlx.Audit, tmp_path: Path
) -> None:
    recipe = load_recipe(audited.folder / "clean.yaml", ("train.epochs=1",))
    assert recipe.dataset.kind == "csv"
    run = tlx.fit(
        audited.folder / "clean.yaml", ["train.epochs=1"], out=tmp_path / "run", cache_dir=messy["cache"]
    )
    assert run.metrics["n_train"] == len(rows(audited.folder / "clean.csv"))
    assert run.metrics["features"]["cached"] > 0


def test_a_warm_audit_computes_no_feature_and_prints_its_summary(
    messy: dict, audited: tlx.Audit, tmp_path: Path, invoke: Callable[..., Result]
) -> None:
    result = invoke(
        "audit",
        LITE0,
        "--set",
        f"dataset.root={messy['root']}",
        "--out",
        tmp_path / "again",
        "--cache-dir",
        messy["cache"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "again" / "audit.json").read_text())
    assert summary["features"]["computed"] == 0
    assert summary["label_issues"] == audited.summary["label_issues"]
    assert f"(cosine ≥ {findings.NEAR_THRESHOLD})" in result.output
    assert f"(default {findings.NEAR_THRESHOLD})" in invoke("audit", "--help").output
    assert "leakage: " in result.output and "imageNotFound.gif" in result.output
    assert f"tlx run {tmp_path / 'again' / 'clean.yaml'}" in result.output


def test_bad_input_is_one_line_and_leaves_nothing(
    messy: dict, tmp_path: Path, invoke: Callable[..., Result]
) -> None:
    one_class = tmp_path / "one"
    shutil.copytree(messy["root"] / "train" / "ants", one_class / "train" / "ants")
    shutil.copytree(messy["root"] / "val" / "ants", one_class / "val" / "ants")
    out = tmp_path / "out"
    result = invoke("audit", LITE0, "--set", f"dataset.root={one_class}", "--out", out)
    assert_user_error(result, "has 1 class folder(s); a classifier needs at least two")
    assert not out.exists()

    lonely = tmp_path / "lonely"
    shutil.copytree(messy["root"], lonely)
    for path in list((lonely / "train" / "bees").iterdir())[1:]:
        path.unlink()
    result = invoke(
        "audit", LITE0, "--set", f"dataset.root={lonely}", "--out", out, "--cache-dir", messy["cache"]
    )
    assert_user_error(result, "dataset: class 'bees' has 1 training image(s)", "add images")
    assert not out.exists()

    (tmp_path / "file").write_text("")
    result = invoke(
        "audit", LITE0, "--set", f"dataset.root={messy['root']}", "--out", tmp_path / "file" / "x"
    )
    assert_user_error(result, f"--out: cannot write to {tmp_path / 'file' / 'x'}")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    result = invoke("audit", LITE0, "--set", f"dataset.root={messy['root']}", "--out", tmp_path / "full")
    assert_user_error(result, "is not empty")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]


def test_a_failure_while_writing_leaves_no_half_written_folder(
    messy: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlx import gallery

    def broken(*args: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery, "gallery", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        tlx.audit(LITE0, [f"dataset.root={messy['root']}"], out=out, cache_dir=messy["cache"])
    assert not out.exists()


def test_confident_learning_flags_an_image_confidently_of_another_class() -> None:
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8], [0.1, 0.9], [0.45, 0.55]])
    given = np.array([0, 0, 0, 1, 1, 1])
    found = findings.label_issues(probabilities, given)
    assert found.thresholds.tolist() == pytest.approx([(0.9 + 0.8 + 0.2) / 3, (0.8 + 0.9 + 0.55) / 3])
    assert found.flagged.tolist() == [False, False, True, False, False, False]
    assert found.suggested.tolist()[2] == 1
    assert found.quality.tolist() == pytest.approx([0.9, 0.8, 0.2, 0.8, 0.9, 0.55])


def test_the_same_bytes_are_an_exact_pair_whatever_the_features() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.99, 0.1]])
    pairs = findings.duplicates(x, ["a", "b", "a", "c"], threshold=0.95)
    assert [(p.a, p.b, p.kind) for p in pairs] == [(0, 2, "exact"), (1, 2, "near"), (0, 3, "near")]


def test_the_page_shows_each_kind_of_finding_in_a_browser(audited: tlx.Audit, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto((audited.folder / "index.html").as_uri())
            expect(page.locator("#label-issues figure")).to_have_count(
                audited.summary["label_issues"]["flagged"]
            )
            expect(page.locator("#label-issues figure").first).to_contain_text("looks like bees")
            expect(page.locator("#leakage figure.pair")).to_have_count(3)
            expect(page.locator("#leakage")).to_contain_text("exact, leakage")
            expect(page.locator("#outliers")).to_contain_text("imageNotFound.gif")
            widths = page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")
            assert len(widths) >= 6 and min(widths) > 0  # every thumbnail decodes
            page.screenshot(path=tmp_path / "audit.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "audit.png").stat().st_size > 0
