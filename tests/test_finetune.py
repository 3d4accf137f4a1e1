"""Fine-tuning: what trains, what stays frozen (BatchNorm statistics too), learning rates, augmentation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import tlx
from tlx import plugins
from tlx.errors import TlxError
from tlx.finetune import training_transform
from tlx.recipe import load_recipe
from tlx.registry import Backbone
from tlx.run import run

from .conftest import CONFIG, make_imagefolder, run_tlx, write_recipe
from .test_run import EPOCH_LINE


class TinyNet(nn.Module):
    """Two conv stages with BatchNorm and pooled output; records the input batches it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.batches.append(x.detach().clone())
        return self.pool(self.stage(self.stem(x)))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    module = TinyNet()
    register = plugins.load().backbones.registrar("test-plugin")
    register("tinynet", lambda name, pretrained, weights: Backbone(module, 6, CONFIG, "test"))
    return module


def finetune_run(tmp_path: Path, root: Path, out: str, *overrides: str) -> dict:
    path = write_recipe(
        tmp_path / "r.yaml",
        f"""
        strategy: finetune
        dataset: {{root: {root}}}
        backbone: {{name: tinynet}}
        train: {{epochs: 2, batch_size: 4, lr: 0.05}}
        finetune: {{backbone_lr: 0.05}}
        extract: {{workers: 0}}
        """,
    )
    return run(load_recipe(path, overrides), "r.yaml", tmp_path / out)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_finetune_trains_the_whole_backbone_and_its_batchnorm_statistics(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet, capsys
) -> None:
    before = snapshot(tiny_net)
    metrics = finetune_run(tmp_path, tiny_dataset, "out")
    assert changed(before, tiny_net) == set(before)  # weights and BatchNorm statistics alike
    assert metrics["strategy"] == "finetune"
    assert (metrics["n_train"], metrics["n_test"], len(metrics["history"])) == (12, 6, 2)
    out = capsys.readouterr().out
    assert len(EPOCH_LINE.findall(out)) == 2
    assert "finetune  unfreeze all: 354 of 354 backbone parameters at lr 0.05" in out


def test_the_feature_strategy_leaves_the_backbone_untouched_and_writes_the_same_keys(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    before = snapshot(tiny_net)
    path = write_recipe(
        tmp_path / "f.yaml", f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: tinynet}}\n"
    )
    held = "train.val_fraction=0.34"  # fine-tuning calibrates on its validation split
    features = run(load_recipe(path, ("train.epochs=2", "extract.workers=0", held)), "f.yaml", tmp_path / "f")
    assert changed(before, tiny_net) == set()
    tuned = finetune_run(tmp_path, tiny_dataset, "t", held)
    assert set(tuned) == set(features)
    assert set(tuned["history"][0]) == set(features["history"][0])
    assert tuned["calibration"]["held_out"] == "validation split (train.val_fraction 0.34)"


def test_finetuning_calibrates_on_its_validation_split_or_says_it_cannot(
    tmp_path: Path, tiny_dataset: Path, capsys
) -> None:
    """The run's "unknown" on its test split (penultimate features of the tuned backbone) is what
    predicting those images from the reloaded run answers."""

    def fresh(name, pretrained, weights):  # the "pretrained" network, as the plugin builds it each time
        torch.manual_seed(0)
        return Backbone(TinyNet(), 6, CONFIG, "test")

    plugins.load().backbones.registrar("test-plugin")("freshnet", fresh)
    held = finetune_run(tmp_path, tiny_dataset, "held", "backbone.name=freshnet", "train.val_fraction=0.34")
    assert (tmp_path / "held" / "calibration.safetensors").is_file()
    results, _ = tlx.load(tmp_path / "held").top_k([str(tiny_dataset / "val")], 2)
    known = sum(r["known"] for r in results) / len(results)
    assert known == pytest.approx(held["ood"]["accepted_test_fraction"])
    capsys.readouterr()
    metrics = finetune_run(tmp_path, tiny_dataset, "plain", "backbone.name=freshnet")
    err = capsys.readouterr().err
    assert "calibration: not fitted" in err and "set train.val_fraction" in err
    assert "calibration" not in metrics and not (tmp_path / "plain" / "calibration.safetensors").exists()


def test_partial_finetuning_freezes_the_rest_in_eval_mode(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    before = snapshot(tiny_net)
    finetune_run(tmp_path, tiny_dataset, "out", "finetune.unfreeze=[stage]")
    # the stem saw every training batch but, frozen and in eval mode, kept its pretrained statistics
    assert {k for k in changed(before, tiny_net) if k.startswith("stem")} == set()
    assert changed(before, tiny_net) == {k for k in before if k.startswith("stage")}


def test_backbone_and_head_have_their_own_learning_rates(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    before = snapshot(tiny_net)
    finetune_run(tmp_path, tiny_dataset, "out", "finetune.backbone_lr=1e-9", "finetune.augment=false")
    moved = max(
        (tiny_net.state_dict()[k] - before[k]).abs().max().item() for k, _ in tiny_net.named_parameters()
    )
    assert 0 < moved < 1e-6


def test_training_images_are_augmented_and_test_images_are_not(tmp_path: Path, tiny_net: TinyNet) -> None:
    root = tmp_path / "textured"
    for split, count in (("train", 4), ("val", 2)):
        for k in range(2):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(
                    0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(10 * k + i)
                )
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / f"c{k}" / f"{i}.png")

    def epoch_inputs(augment: bool) -> list[list[float]]:
        tiny_net.batches.clear()
        finetune_run(tmp_path, root, f"out-{augment}", "train.batch_size=8", f"finetune.augment={augment}")
        # one batch per epoch holds every training image; compare them regardless of order
        return [sorted(batch.sum(dim=(1, 2, 3)).tolist()) for batch in tiny_net.batches]

    first, second = epoch_inputs(augment=False)
    assert first == pytest.approx(second)
    first, second = epoch_inputs(augment=True)
    assert first != pytest.approx(second)


def test_training_transform_crops_and_flips_at_the_input_size() -> None:
    backbone = Backbone(nn.Identity(), 3, CONFIG, "test")
    image = Image.new("RGB", (64, 48))
    image.paste((255, 0, 0), (0, 0, 32, 48))  # left half red: a flip moves it
    augment = training_transform(backbone, augment=True)
    torch.manual_seed(0)
    crops = [augment(image) for _ in range(20)]
    assert {tuple(c.shape) for c in crops} == {(3, 32, 32)}
    assert len({round(float(c.sum()), 3) for c in crops}) > 10
    plain = training_transform(backbone, augment=False)
    assert (plain(image) == plain(image)).all()


def test_unknown_module_names_list_what_the_backbone_has(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    with pytest.raises(
        TlxError, match=r"finetune.unfreeze: the backbone has no module 'stages'; it has stem, stage, pool"
    ):
        finetune_run(tmp_path, tiny_dataset, "a", "finetune.unfreeze=[stages]")
    with pytest.raises(TlxError, match=re.escape("no module 'stage.7'; it has stage.0, stage.1, stage.2")):
        finetune_run(tmp_path, tiny_dataset, "b", "finetune.unfreeze=[stage.7]")
    with pytest.raises(TlxError, match=r"finetune.unfreeze: pool hold no parameters to train"):
        finetune_run(tmp_path, tiny_dataset, "c", "finetune.unfreeze=[pool]")


def test_same_seed_gives_the_same_finetuned_numbers(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    initial = snapshot(tiny_net)

    def history(out: str, seed: int) -> list:
        tiny_net.load_state_dict(initial)
        return finetune_run(tmp_path, tiny_dataset, out, f"seed={seed}")["history"]

    first = history("a", 0)
    assert history("b", 0) == first
    assert history("c", 1) != first


def test_finetune_section_needs_the_finetune_strategy(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path / "r.yaml", "dataset: {root: d}\nbackbone: {name: x}\nfinetune: {augment: false}\n"
    )
    with pytest.raises(TlxError, match=r"finetune: applies to strategy: finetune only"):
        load_recipe(path)
    assert load_recipe(path, ("strategy=finetune",)).finetune.augment is False
    with pytest.raises(TlxError, match=r"strategy: Input should be 'features' or 'finetune'"):
        load_recipe(path, ("strategy=fine-tune",))


def test_a_timm_model_finetunes_its_last_stage(tmp_path: Path, tiny_dataset: Path) -> None:
    import timm

    model = timm.create_model("test_efficientnet", num_classes=0)
    before = snapshot(model)
    register = plugins.load().backbones.registrar("test-plugin")
    config = timm.data.resolve_data_config({}, model=model)
    register(
        "tiny-timm", lambda name, pretrained, weights: Backbone(model, model.num_features, config, "random")
    )
    path = write_recipe(
        tmp_path / "r.yaml",
        f"""
        strategy: finetune
        dataset: {{root: {tiny_dataset}}}
        backbone: {{name: tiny-timm}}
        train: {{epochs: 1, batch_size: 6, optimizer: adamw, schedule: cosine}}
        finetune: {{unfreeze: [blocks.4, conv_head, bn2]}}
        extract: {{workers: 0}}
        """,
    )
    metrics = run(load_recipe(path), "r.yaml", tmp_path / "out")
    assert metrics["n_train"] == 12 and 0 <= metrics["test_accuracy"] <= 1
    moved = {k.split(".")[0] + (".4" if k.startswith("blocks.4") else "") for k in changed(before, model)}
    assert moved == {"blocks.4", "conv_head", "bn2"}


def test_finetuning_uses_the_recipes_optimizer_and_schedule(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    initial = snapshot(tiny_net)

    def weights(out: str, *overrides: str) -> dict[str, torch.Tensor]:
        tiny_net.load_state_dict(initial)
        finetune_run(tmp_path, tiny_dataset, out, "finetune.augment=false", *overrides)
        return {k: v.clone() for k, v in tiny_net.named_parameters()}

    one = weights("one", "train.epochs=1")
    # the learning rate is cut a billionfold after the first epoch: the second one barely moves anything
    cut = weights("cut", "train.schedule=step", "train.step_size=1", "train.gamma=1e-9")
    assert all(torch.allclose(one[k], cut[k], atol=1e-6) for k in one)
    sgd = weights("sgd")
    adamw = weights("adamw", "train.optimizer=adamw")
    assert not all(torch.allclose(sgd[k], adamw[k], atol=1e-4) for k in sgd)
    assert not all(torch.allclose(sgd[k], one[k], atol=1e-4) for k in sgd)


def test_shipped_finetune_recipe_runs_on_its_backbone(tmp_path: Path) -> None:
    """The recipe's unfreeze names exist in EfficientNet-Lite0; one epoch on a small generated dataset."""
    root = make_imagefolder(tmp_path / "small", classes=2, per_class=(4, 2))
    result = run_tlx(
        "run", "hymenoptera-finetune", "--set", f"dataset.root={root}",
        "--set", "train.epochs=2", "--set", "train.warmup_epochs=1", "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "finetune  unfreeze blocks.5, blocks.6, conv_head, bn2: 2,670,240 of 3,371,008" in result.stdout
    rows = re.findall(r"^ +\d{1,3} +\d+\.\d{4} +\d+\.\d{4} +\d{1,3}\.\d\d% .*\d\d:\d\d$", result.stdout, re.M)
    assert len(rows) == 2  # with the recipe's validation columns
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["strategy"], metrics["n_train"], metrics["n_test"]) == ("finetune", 8, 4)
    assert metrics["calibration"]["held_out"] == "validation split (train.val_fraction 0.2)"


def test_a_finetuned_run_is_reloaded_with_its_trained_backbone(tmp_path: Path, tiny_dataset: Path) -> None:
    from tlx.artifacts import load_run
    from tlx.evaluate import evaluate

    def fresh(name, pretrained, weights):  # the "pretrained" network, as the plugin builds it each time
        torch.manual_seed(0)
        return Backbone(TinyNet(), 6, CONFIG, "test")

    plugins.load().backbones.registrar("test-plugin")("freshnet", fresh)
    metrics = finetune_run(tmp_path, tiny_dataset, "out", "backbone.name=freshnet", "train.epochs=3")
    reloaded = load_run(tmp_path / "out")
    pretrained = fresh("freshnet", True, None).module.state_dict()
    tuned = reloaded.frozen.module.state_dict()
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in pretrained)
    scores, _ = evaluate(reloaded)
    assert scores.accuracy == metrics["test_accuracy"]


def test_a_finetuned_runs_backbone_file_edited_or_removed_is_refused(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    """Without its fine-tuned weights the run would load the pretrained backbone and predict otherwise."""
    from tlx.artifacts import load_run

    finetune_run(tmp_path, tiny_dataset, "out", "train.epochs=1")
    tuned = tmp_path / "out" / "backbone.safetensors"
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert set(provenance["files"]) == {"recipe.yaml", "head.safetensors", "backbone.safetensors"}
    original = tuned.read_bytes()
    tuned.write_bytes(original[:-4] + b"\0\0\0\0")
    with pytest.raises(TlxError, match=re.escape(f"{tuned}: edited since the run wrote it")):
        load_run(tmp_path / "out")
    tuned.unlink()
    for digests in (provenance, {k: v for k, v in provenance.items() if k != "files"}):  # and an older run
        (tmp_path / "out" / "provenance.json").write_text(json.dumps(digests))
        missing = "recipe.yaml: strategy is finetune, but backbone.safetensors is missing"
        with pytest.raises(TlxError, match=re.escape(missing)):
            load_run(tmp_path / "out")


def test_bad_image_policy_applies_to_finetuning(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    (tiny_dataset / "train" / "class0" / "notes.jpg").write_text("not an image")
    with pytest.raises(TlxError, match=r"extract.on_bad_image: cannot decode .*notes.jpg"):
        finetune_run(tmp_path, tiny_dataset, "strict", "extract.on_bad_image=error")
    assert finetune_run(tmp_path, tiny_dataset, "lenient")["skipped"][0]["path"].endswith("notes.jpg")


def test_validation_split_early_stopping_keeps_the_best_epoch(tmp_path: Path, tiny_net: TinyNet) -> None:
    root = make_imagefolder(tmp_path / "d", classes=2, per_class=(10, 3))
    metrics = finetune_run(
        tmp_path, root, "a", "train.epochs=6", "train.val_fraction=0.3", "train.patience=1", "train.lr=0.5"
    )
    assert (metrics["n_fit"], metrics["n_val"], metrics["n_train"]) == (14, 6, 20)
    history = metrics["history"]
    assert all("val_loss" in h and "val_accuracy" in h for h in history)
    best = min(history, key=lambda h: h["val_loss"])
    assert metrics["chosen"] == {"epochs": best["epoch"]}
    assert metrics["test_accuracy"] == best["test_accuracy"]  # the kept weights are the best epoch's
    if best["epoch"] < 6:
        assert len(history) == best["epoch"] + 1  # stopped after one epoch without improvement


def test_balanced_class_weights_weigh_the_finetuning_loss(tmp_path: Path, tiny_net: TinyNet) -> None:
    root = make_imagefolder(tmp_path / "d", classes=2, per_class=(6, 3))
    for image in sorted((root / "train" / "class1").iterdir())[:4]:
        image.unlink()  # 6 against 2 images
    plain = finetune_run(tmp_path, root, "a")["history"]
    tiny_net.load_state_dict(snapshot(tiny_net))
    weighted = finetune_run(tmp_path, root, "b", "train.class_weight=balanced")["history"]
    assert plain[0]["train_loss"] != weighted[0]["train_loss"]


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("extract.flip=true", ["extract.flip", "strategy: finetune"]),
        ("head.type=logreg", ["head.type: logreg", "strategy: finetune"]),
    ],
)
def test_keys_that_cannot_apply_to_finetuning_are_refused(
    override: str, words: list[str], tmp_path: Path, tiny_net: TinyNet
) -> None:
    with pytest.raises(TlxError) as caught:
        finetune_run(tmp_path, tiny_dataset_for(tmp_path), "a", override)
    for word in words:
        assert word in str(caught.value)


def tiny_dataset_for(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "d", classes=2)


def test_diverging_finetuning_stops_at_its_first_epoch_naming_the_rates(
    tmp_path: Path, tiny_dataset: Path, tiny_net: TinyNet
) -> None:
    rates = ("train.lr=1e30", "finetune.backbone_lr=1e30", "train.weight_decay=1e30")
    with pytest.raises(TlxError) as info:
        finetune_run(tmp_path, tiny_dataset, "out", *rates)
    assert str(info.value) == (
        "training diverged at epoch 1: the loss is nan; lower train.lr (now 1e+30) or "
        "finetune.backbone_lr (now 1e+30) or train.weight_decay (now 1e+30)"
    )
