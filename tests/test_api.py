"""The Python API: ``tlx.fit`` trains like ``tlx run`` and prints nothing; ``tlx.load`` gives a classifier
with the numbers of ``tlx predict``, for files, folders and in-memory images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tlx
from tlx.recipe import BUNDLED, load_recipe

from .conftest import HYMENOPTERA, run_tlx, write_recipe

LITE0 = BUNDLED / "hymenoptera-lite0.yaml"


def small_hymenoptera(root: Path, per_class: tuple[int, int] = (6, 3)) -> Path:
    """The first few ants and bees of each split, copied: a real dataset that trains in seconds."""
    for split, count in zip(("train", "val"), per_class):
        for name in ("ants", "bees"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for path in sorted((HYMENOPTERA / split / name).iterdir())[:count]:
                shutil.copy(path, folder / path.name)
    return root


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tlx.Run]:
    """A quiet fit of EfficientNet-Lite0 on a few ants and bees (its weights ship with its plugin)."""
    tmp = tmp_path_factory.mktemp("lite0")
    data = small_hymenoptera(tmp / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield tlx.fit(
            LITE0, [f"dataset.root={data}", "train.epochs=2"], out=tmp / "run", cache_dir=tmp / "cache"
        )


def counting_dict(root: Path, **sections: dict) -> dict:
    """A recipe as a dict, for the in-process counting backbone (mean colour per channel)."""
    return {
        "dataset": {"root": str(root)},
        "backbone": {"name": "counting"},
        "extract": {"workers": 0},
        **sections,
    }


def test_quiet_fit_prints_nothing_and_keeps_the_warnings(
    tmp_path: Path, hymenoptera: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = small_hymenoptera(tmp_path / "data", (4, 2))
    capfd.readouterr()
    run = tlx.fit(
        LITE0,
        {"dataset.root": str(data), "backbone.pretrained": False, "train.epochs": 2},
        out=tmp_path / "run",
    )
    printed = capfd.readouterr()  # at the file descriptors: worker processes and C code included
    assert (printed.out, printed.err) == ("", "")
    assert run.warnings == ["the backbone has random weights (backbone.pretrained: false)"]
    assert run.folder == tmp_path / "run"
    assert run.metrics == json.loads((run.folder / "metrics.json").read_text())
    assert run.metrics["features"]["computed"] == 12


def test_a_quiet_fit_keeps_cache_warnings_instead_of_printing_them(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, capfd: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.write_text("")  # a file, not a folder: the features cannot be kept
    run = tlx.fit(counting_dict(tiny_dataset), out=tmp_path / "run", cache_dir=cache)
    printed = capfd.readouterr()
    assert (printed.out, printed.err) == ("", "")
    assert any(w.startswith("cache: cannot write") for w in run.warnings), run.warnings


def test_fit_without_quiet_prints_like_tlx_run(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tlx.fit(counting_dict(tiny_dataset, train={"epochs": 2}), out=tmp_path / "run", quiet=False)
    out = capsys.readouterr().out
    assert "   epoch  train_loss  test_loss  test_accuracy   time\n       1  " in out
    assert "\n       2  " in out and f"run folder {run.folder}" in out and "\ntotal time " in out
    assert run.warnings == []


def test_a_run_is_one_line_and_progress_bars_are_notebook_aware(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tqdm.auto

    from tlx import notices

    run = tlx.fit(counting_dict(tiny_dataset, train={"epochs": 2}), out=tmp_path / "run")
    accuracy = run.metrics["test_accuracy"]
    backbone = run.metrics["backbone"]["name"]
    assert repr(run) == (
        f"Run({str(run.folder)!r}, backbone={backbone!r}, head='linear', test_accuracy={accuracy:.4f})"
    )
    drawn: list[dict] = []
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda iterable=None, **options: drawn.append(options))
    notices.bar([1], desc="features")  # tqdm.auto: a widget in Jupyter, text elsewhere
    with notices.collected([]):
        notices.bar([1], desc="features")
    assert [d["disable"] for d in drawn] == [False, True]  # quiet: not drawn


def test_fit_takes_a_dict_with_paths_from_the_current_folder(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_dataset.parent)
    recipe = counting_dict(Path(tiny_dataset.name))
    run = tlx.fit(recipe, ["train.epochs=2"])
    assert recipe == counting_dict(Path(tiny_dataset.name))  # the caller's dict is left as it was
    assert run.folder.parent == Path("runs") and run.folder.name.endswith("-recipe")
    resolved = load_recipe(run.folder / "recipe.yaml")
    assert resolved.dataset.options["root"] == str(tiny_dataset.resolve())
    assert resolved.train.epochs == 2
    assert [h["epoch"] for h in run.metrics["history"]] == [1, 2]


def test_fit_takes_a_recipe_object_and_overrides(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    recipe = tlx.Recipe.model_validate(counting_dict(tiny_dataset))
    run = tlx.fit(recipe, {"train.epochs": 3, "head.type": "mlp"}, out=tmp_path / "run")
    assert run.metrics["head"] == "mlp" and len(run.metrics["history"]) == 3
    assert recipe.train.epochs != 3  # the caller's recipe is left as it was
    assert "finetune" not in load_recipe(run.folder / "recipe.yaml").model_fields_set


def test_fit_refuses_bad_recipes_in_one_line(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> None:
    with pytest.raises(tlx.TlxError, match=r"^recipe: unknown key train.epoch; did you mean train.epochs\?$"):
        tlx.fit(counting_dict(tiny_dataset, train={"epoch": 2}), out=tmp_path / "a")
    with pytest.raises(tlx.TlxError, match=r"^--set train.epochs: train.epochs: Input should be"):
        tlx.fit(counting_dict(tiny_dataset), {"train.epochs": "many"}, out=tmp_path / "b")
    with pytest.raises(tlx.TlxError, match="recipe file not found"):
        tlx.fit(tmp_path / "absent.yaml")
    with pytest.raises(TypeError, match=r"expected a file path, a dict or a tlx\.Recipe, not int"):
        tlx.fit(3)  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fit_refuses_a_folder_that_holds_a_run(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: counting}}\n"
    )
    tlx.fit(recipe, out=tmp_path / "run")
    with pytest.raises(tlx.TlxError, match="already holds a run"):
        tlx.fit(recipe, out=tmp_path / "run")


def test_load_predicts_as_tlx_predict_from_another_process(lite0_run: tlx.Run) -> None:
    folder = lite0_run.folder
    image = next((HYMENOPTERA / "val" / "bees").iterdir())
    code = f"import json, tlx; c = tlx.load({str(folder)!r}); print(json.dumps(c.predict([{str(image)!r}])))"
    api = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert api.returncode == 0, api.stderr
    cli = run_tlx("predict", folder, image, "--json")
    assert cli.returncode == 0, cli.stderr
    (expected,) = json.loads(cli.stdout)
    ((label, probability, known, ood_score),) = json.loads(api.stdout)
    assert (label, known) == (expected["label"], expected["known"])
    assert abs(probability - expected["probability"]) < 1e-6
    assert abs(ood_score - expected["ood_score"]) < 1e-6


def test_predict_proba_of_a_folder_matches_tlx_predict(lite0_run: tlx.Run, invoke) -> None:
    folder = lite0_run.folder.parent / "data" / "val"
    classifier = tlx.load(lite0_run.folder)
    assert classifier.classes == ["ants", "bees"]
    result = invoke("predict", lite0_run.folder, folder, "--json", "--top-k", "2")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    by_label = [{t["label"]: t["probability"] for t in r["top_k"]} for r in rows]
    expected = np.array([[p[c] for c in classifier.classes] for p in by_label])
    probabilities = classifier.predict_proba(folder)
    assert probabilities.shape == (len(rows), 2)
    assert np.abs(probabilities - expected).max() < 1e-6
    assert [p.label for p in classifier.predict(str(folder))] == [r["label"] for r in rows]


def test_pil_images_are_decoded_and_preprocessed_as_files(tmp_path: Path, lite0_run: tlx.Run) -> None:
    # a photo stored turned a quarter left with EXIF orientation 6, a palette image, a grey one
    photo = next((HYMENOPTERA / "val" / "ants").iterdir())
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(photo) as image:
        image.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tagged.jpg", exif=exif, quality=95)
        image.convert("P").save(tmp_path / "palette.png")
        image.convert("I;16").save(tmp_path / "grey16.png")
    files = [tmp_path / "tagged.jpg", tmp_path / "palette.png", tmp_path / "grey16.png"]
    opened = [Image.open(p) for p in files]
    modes = [image.mode for image in opened]
    classifier = lite0_run.load()
    assert np.abs(classifier.predict_proba(opened) - classifier.predict_proba(files)).max() < 1e-6
    assert [image.mode for image in opened] == modes  # the caller's images are left as they were
    untagged = opened[0].copy()
    untagged.info.pop("exif")
    assert np.abs(classifier.predict_proba([untagged]) - classifier.predict_proba(files[:1])).max() > 1e-3


def test_predict_refuses_what_it_cannot_decode(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> None:
    classifier = tlx.fit(counting_dict(tiny_dataset), out=tmp_path / "run").load()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(tlx.TlxError, match=rf"^{broken}: cannot decode the image \(.*\); pass only images$"):
        classifier.predict([tiny_dataset / "val" / "class0" / "0.jpg", broken])
    with pytest.raises(tlx.TlxError, match="no such file or folder"):
        classifier.predict(tmp_path / "absent.jpg")
    assert classifier.predict_proba([]).shape == (0, 2)


def test_numpy_arrays_are_images_and_other_values_one_line_errors(tmp_path: Path, lite0_run: tlx.Run) -> None:
    photo = next((HYMENOPTERA / "val" / "bees").iterdir())
    classifier = lite0_run.load()
    with Image.open(photo) as image:
        rgb = np.asarray(image.convert("RGB"))
        grey = np.asarray(image.convert("L"))
    expected = classifier.predict_proba(photo)
    assert np.abs(classifier.predict_proba(rgb) - expected).max() < 1e-6  # H×W×3 is one image
    assert classifier.predict_proba(np.stack([rgb, rgb])).shape == (2, 2)  # N×H×W×3 a batch
    assert classifier.predict_proba([grey, grey[:, :, None]]).shape == (2, 2)
    refused = [
        (None, r"^images: expected a file or folder path, .* not None$"),
        ([None], r"^images\[0\]: expected .*, not None$"),
        (photo.read_bytes(), r"^images: .* not bytes \(decode them first: PIL.Image.open"),
        ([photo, 3], r"^images\[1\]: expected .*, not int$"),
        (rgb.astype(np.float32), r"^images\[0\]: a numpy array of float32 with shape .* is not an image"),
        (rgb[:, :, :2], r"^images\[0\]: a numpy array of uint8 with shape \(\d+, \d+, 2\) is not an image"),
    ]
    for value, message in refused:
        for call in (classifier.predict, classifier.predict_proba, classifier.top_k):
            with pytest.raises(tlx.TlxError, match=message):
                call(value)


def test_the_public_names_load_without_torch() -> None:
    code = (
        "import sys, tlx; tlx.fit, tlx.load, tlx.Run, tlx.Classifier, tlx.Recipe; "
        "assert 'torch' not in sys.modules, 'tlx.fit imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
