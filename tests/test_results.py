"""What a run leaves behind, and the commands that use it: predict, eval, export; the stronger heads."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from tlx.default_plugins.heads import LogRegOptions
from tlx.extraction.flip import FlipAveraged
from tlx.folds import hold_out
from tlx.logreg import LogisticRegression
from tlx.recipe import BUNDLED, load_recipe
from tlx.run import run
from tlx.tensors import Features
from tlx.train import class_weights

from .conftest import make_imagefolder, recipe_for, run_tlx

RUN_FILES = {
    "recipe.yaml", "provenance.json", "metrics.json", "history.csv", "head.safetensors",
    "per_class.csv", "predictions.csv", "curves.png", "confusion.png", "errors.png",
}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_holds_every_artifact(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, capsys
) -> None:
    out = tmp_path / "out"
    metrics = run(recipe_for(tmp_path, tiny_dataset, "train.epochs=3"), "r.yaml", out)
    assert {p.name for p in out.iterdir()} >= RUN_FILES

    resolved = load_recipe(out / "recipe.yaml")  # a valid recipe again, every default written out
    text = (out / "recipe.yaml").read_text()
    for key in ("val_fraction: 0.0", "class_weight: null", "flip: false", "type: linear", "momentum: 0.9"):
        assert key in text
    assert resolved.dataset.options["root"] == str(tiny_dataset.resolve())

    provenance = json.loads((out / "provenance.json").read_text())
    assert {"python", "tlx", "torch", "timm", "plugins"} <= provenance.keys()
    assert provenance["torch"] == torch.__version__
    assert provenance["backbone"]["sha256"] == metrics["backbone"]["sha256"]

    history = read_csv(out / "history.csv")
    assert [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "train_loss", "test_loss", "test_accuracy"}

    with safe_open(str(out / "head.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["class0", "class1"]
        assert f.get_tensor("weight").shape == (2, 3)

    per_class = read_csv(out / "per_class.csv")
    assert [r["class"] for r in per_class] == ["class0", "class1"]
    assert [int(r["support"]) for r in per_class] == [3, 3]
    assert metrics["per_class"][0]["recall"] == pytest.approx(
        metrics["confusion"][0][0] / sum(metrics["confusion"][0])
    )
    assert metrics["test_accuracy"] == pytest.approx(sum(metrics["confusion"][i][i] for i in range(2)) / 6)

    for name in ("curves.png", "confusion.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 400
    summary = capsys.readouterr().out
    assert (
        "precision  recall" in summary and "weakest class class" in summary and f"run folder {out}" in summary
    )


def test_logreg_chooses_l2_by_cross_validation_and_is_a_linear_layer(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    out = tmp_path / "out"
    metrics = run(
        recipe_for(tmp_path, tiny_dataset, "head.type=logreg", "head.l2=[0.001, 0.1, 10]"), "r", out
    )
    assert metrics["chosen"]["l2"] in (0.001, 0.1, 10)
    assert metrics["chosen"]["selected_by"] == "5-fold cross-validation"
    assert [r["l2"] for r in metrics["history"]] == [0.001, 0.1, 10]
    assert all("val_loss" in r for r in metrics["history"])
    assert metrics["test_accuracy"] == 1.0  # the classes differ in colour
    with safe_open(str(out / "head.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"linear.weight", "linear.bias"}


def test_logreg_matches_the_optimum_of_its_objective() -> None:
    """The folded nn.Linear predicts like the solution on standardized features, at a gradient of ~0."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=generator) * torch.tensor([1.0, 10, 0.1, 3, 1]) + 4
    y = (x[:, 0] + 0.1 * x[:, 1] + torch.randn(90, generator=generator) > 4.5).long() + (x[:, 3] > 6).long()
    head = LogisticRegression(5, 3, **LogRegOptions(l2=[0.05]).model_dump())
    head.fit(Features(x, y, []), None, class_weight=None, seed=0)
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    weight, bias = head.linear.weight.detach().double(), head.linear.bias.detach().double()
    w = (weight * x.std(0, unbiased=False).double()).requires_grad_()
    b = (bias + weight @ x.mean(0).double()).requires_grad_()
    loss = nn.functional.cross_entropy(z.double() @ w.T + b, y) + 0.025 * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_validation_split_is_stratified_and_seeded() -> None:
    y = torch.tensor([0] * 20 + [1] * 10)
    features = Features(torch.arange(30.0).unsqueeze(1), y, [])
    fit, val = hold_out(features, 0.2, seed=3)
    assert torch.bincount(val.y).tolist() == [4, 2] and torch.bincount(fit.y).tolist() == [16, 8]
    assert set(fit.x.flatten().tolist()).isdisjoint(val.x.flatten().tolist())
    assert torch.equal(hold_out(features, 0.2, seed=3)[1].x, val.x)
    assert not torch.equal(hold_out(features, 0.2, seed=4)[1].x, val.x)


def test_validation_split_chooses_l2_and_stops_early(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    logreg = run(
        recipe_for(tmp_path, tiny_dataset, "head.type=logreg", "train.val_fraction=0.34"), "r", tmp_path / "a"
    )
    assert logreg["chosen"]["selected_by"] == "validation split"
    assert (logreg["n_fit"], logreg["n_val"], logreg["n_train"]) == (8, 4, 12)
    sgd = run(
        recipe_for(tmp_path, tiny_dataset, "train.val_fraction=0.34", "train.patience=2", "train.epochs=200"),
        "r",
        tmp_path / "b",
    )
    losses = [h["val_loss"] for h in sgd["history"]]
    best = losses.index(min(losses)) + 1
    assert sgd["chosen"]["epochs"] == best
    assert len(losses) <= 200 and (len(losses) == 200 or len(losses) == best + 2)
    assert {"val_loss", "val_accuracy"} <= set(read_csv(tmp_path / "b" / "history.csv")[0])


def test_patience_without_validation_is_a_recipe_error(tmp_path: Path, tiny_dataset: Path) -> None:
    with pytest.raises(Exception, match=r"patience needs a validation split; set train.val_fraction"):
        recipe_for(tmp_path, tiny_dataset, "train.patience=3")


def test_balanced_class_weights() -> None:
    weights = class_weights(torch.tensor([0, 0, 0, 1]), 2, "balanced")
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2])


def test_balanced_weights_run_on_imbalanced_data(tmp_path: Path, counting_backbone) -> None:
    root = make_imagefolder(tmp_path / "d", classes=2, per_class=(6, 2))
    for path in sorted((root / "train" / "class1").iterdir())[1:]:
        path.unlink()
    metrics = run(
        recipe_for(tmp_path, root, "train.class_weight=balanced", "head.type=mlp"), "r", tmp_path / "o"
    )
    assert metrics["n_train"] == 7


def test_flip_averaging_sees_each_image_and_its_mirror(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    asymmetric = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(5, 3, 4, 4)
    expected = (asymmetric(x) + asymmetric(x.flip(-1))) / 2
    assert torch.allclose(FlipAveraged(asymmetric)(x), expected, atol=1e-6)
    assert not torch.allclose(asymmetric(x), expected)
    overrides = ("extract.flip=true", "train.epochs=1", "extract.runtime=torch")  # the module counts in torch
    run(recipe_for(tmp_path, tiny_dataset, *overrides), "r", tmp_path / "out")
    assert counting_backbone.seen == 2 * (12 + 6)


def test_same_recipe_and_seed_give_identical_run_folders(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    def folder(name: str, *overrides: str) -> dict[str, bytes]:
        out = tmp_path / name
        run(recipe_for(tmp_path, tiny_dataset, *overrides), "r", out)
        metrics = json.loads((out / "metrics.json").read_text())
        metrics.pop("seconds")
        metrics.pop("features")  # where the features came from: the second run reads the cache
        files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in {".csv", ".yaml"}}
        assert {"history.csv", "per_class.csv", "predictions.csv"} <= files.keys()
        with safe_open(str(out / "head.safetensors"), framework="pt") as f:  # its header order varies
            head = json.dumps(f.metadata(), sort_keys=True).encode()
            head += b"".join(f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys()))
        return {**files, "head": head, "metrics": json.dumps(metrics).encode()}

    for overrides in (
        ("train.val_fraction=0.34", "train.patience=3"),
        ("head.type=logreg", "extract.flip=true"),
    ):
        first = folder(f"a{len(overrides[0])}", *overrides)
        assert folder(f"b{len(overrides[0])}", *overrides) == first
    assert (
        folder("seed1", "seed=1", "train.val_fraction=0.34")["history.csv"]
        != folder("seed0", "train.val_fraction=0.34")["history.csv"]
    )


@pytest.fixture
def trained(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> Path:
    out = tmp_path / "run"
    run(recipe_for(tmp_path, tiny_dataset, "head.type=logreg"), "r", out)
    return out


def test_predict_prints_label_and_probability(trained: Path, tiny_dataset: Path, invoke) -> None:
    image = tiny_dataset / "val" / "class1" / "0.jpg"
    result = invoke("predict", trained, image)
    assert result.exit_code == 0, result.output
    path, label = result.stdout.strip().split("\t")
    assert path == str(image) and label.startswith("class1 ") and label.endswith("%")

    result = invoke("predict", trained, tiny_dataset / "val", "--json", "--top-k", "2")
    items = json.loads(result.stdout)
    assert len(items) == 6 and [i["label"] for i in items] == ["class0"] * 3 + ["class1"] * 3
    assert all(set(i) == {"path", "label", "probability", "top_k", "known", "ood_score"} for i in items)
    assert all(sum(t["probability"] for t in i["top_k"]) == pytest.approx(1) for i in items)
    assert set(json.loads(invoke("predict", trained, image, "--json").stdout)[0]) == {
        "path", "label", "probability", "known", "ood_score"
    }  # fmt: skip


def test_predict_skips_undecodable_files_and_rejects_missing_paths(
    trained: Path, tiny_dataset: Path, tmp_path: Path, invoke
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    result = invoke("predict", trained, broken, tiny_dataset / "val" / "class0" / "1.jpg")
    assert result.exit_code == 0
    assert f"skipped {broken}" in result.stderr and len(result.stdout.strip().splitlines()) == 1
    missing = invoke("predict", trained, tmp_path / "absent.jpg")
    assert missing.exit_code == 2 and "absent.jpg: no such file or folder" in missing.stderr


def test_predict_refuses_changed_backbone_weights(trained: Path, tiny_dataset: Path, invoke) -> None:
    provenance = json.loads((trained / "provenance.json").read_text())
    provenance["backbone"]["sha256"] = "0" * 64
    (trained / "provenance.json").write_text(json.dumps(provenance))
    result = invoke("predict", trained, tiny_dataset / "val")
    assert result.exit_code == 2 and "have changed since the run" in result.stderr


def test_eval_rescores_a_run_and_checks_the_classes(trained: Path, tmp_path: Path, invoke) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    same = json.loads(invoke("eval", trained, "--json").stdout)
    # the keys of metrics.json: one name for the split the accuracy is measured on
    assert same["test_accuracy"] == metrics["test_accuracy"] and same["confusion"] == metrics["confusion"]
    assert same["n_test"] == metrics["n_test"] and "accuracy" not in same
    other = make_imagefolder(tmp_path / "other", classes=2, per_class=(2, 4))
    result = invoke("eval", trained, "--set", f"dataset.root={other}")
    assert result.exit_code == 0 and "test accuracy 100.00% on 8 images" in result.output
    three = make_imagefolder(tmp_path / "three", classes=3, per_class=(2, 2))
    result = invoke("eval", trained, "--set", f"dataset.root={three}")
    assert result.exit_code == 2 and "has classes class0, class1, class2" in result.stderr


def test_not_a_run_folder(tmp_path: Path, invoke) -> None:
    result = invoke("eval", tmp_path)
    assert result.exit_code == 2 and "not a finished tlx run folder" in result.stderr


def test_torchscript_export_matches_pytorch(trained: Path, tmp_path: Path, invoke) -> None:
    from tlx.artifacts import load_run

    output = tmp_path / "exported" / "classifier.pt"
    result = invoke("export", trained, "--format", "torchscript", "--output", output)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "exported" / "classifier.preprocessing.json").read_text())
    assert meta["data_config"]["mean"] == [0.5, 0.5, 0.5] and meta["classes"] == ["class0", "class1"]
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (torch.jit.load(str(output))(images) - load_run(trained).model()(images)).abs().max() < 1e-5


def test_onnx_export_of_a_real_backbone_matches_pytorch(tmp_path: Path, hymenoptera: Path) -> None:
    """EfficientNet-Lite0 + flip averaging + logreg: onnxruntime gives PyTorch's logits on real images."""
    import onnxruntime
    from PIL import Image

    from tlx.artifacts import load_run
    from tlx.extraction.preprocess import eval_transform

    data = tmp_path / "d"  # a few real ants and bees: realistic features, so logits of a usual size
    for split, count in (("train", 4), ("val", 1)):
        for name in ("ants", "bees"):
            (data / split / name).mkdir(parents=True)
            for path in sorted((hymenoptera / split / name).glob("*.jpg"))[:count]:
                shutil.copy(path, data / split / name / path.name)
    out = tmp_path / "run"
    recipe = BUNDLED / "hymenoptera-lite0.yaml"
    result = run_tlx("run", recipe, "--set", f"dataset.root={data}", "--set", "extract.flip=true",
                     "--set", "head.type=logreg", "--set", "head.l2=[1.0]", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run_tlx("export", out, "--format", "onnx")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "model.preprocessing.json").read_text())
    assert meta["data_config"]["input_size"] == [3, 224, 224] and meta["flip_averaged"] is True

    trained = load_run(out)
    paths = sorted((hymenoptera / "val" / "ants").iterdir())[:3]
    transform = eval_transform(trained.info.data_config)
    images = torch.from_numpy(
        np.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    )  # batch of 3, exported with 2
    with torch.inference_mode():
        expected = trained.model()(images).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (logits,) = session.run(["logits"], {"image": images.numpy()})
    assert logits.shape == (3, 2)
    assert abs(logits - expected).max() < 1e-4

    result = run_tlx("predict", out, *paths[:2], "--json")
    assert result.returncode == 0, result.stderr
    assert [i["path"] for i in json.loads(result.stdout)] == [str(p) for p in paths[:2]]
