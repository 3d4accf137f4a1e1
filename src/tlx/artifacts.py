"""The run folder: everything needed to trust, inspect and reuse a trained classifier, offline.

Written by ``tlx run``; read back by ``tlx predict``, ``tlx eval`` and ``tlx export``:

- ``recipe.yaml``      the recipe with every default filled in (component options too), paths absolute
- ``provenance.json``  versions of Python, tlx, torch, timm and each plugin; the backbone weights' SHA-256
- ``metrics.json``     final scores, the training history, the choices made on the training split
- ``history.csv``      one row per epoch (or per L2 strength for a closed-form head)
- ``head.safetensors`` the trained head, with the class names, head type and feature size as metadata
- ``backbone.safetensors`` the trained backbone, for ``strategy: finetune`` only
- ``per_class.csv``    precision, recall, F1 and support of each class on the test split
- ``curves.png``, ``confusion.png``
"""

from __future__ import annotations

import csv
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn

from tlx.backbone import Backbone
from tlx.errors import TlxError
from tlx.files import write_json
from tlx.plots import Painter
from tlx.recipe import Recipe, load_recipe
from tlx.scores import Scores

HEAD_FILE = "head.safetensors"
RECIPE_FILE = "recipe.yaml"
PROVENANCE_FILE = "provenance.json"
TUNED_BACKBONE_FILE = "backbone.safetensors"


def resolved_recipe(recipe: Recipe, dataset_options: BaseModel, head_options: BaseModel) -> dict[str, Any]:
    """The recipe as run: defaults filled in, plugin options validated, relative paths made absolute."""
    data = recipe.model_dump(mode="json", exclude={"finetune"} if recipe.strategy == "features" else None)
    data["dataset"] = {"kind": recipe.dataset.kind, **dataset_options.model_dump(mode="json")}
    data["head"] = {"type": recipe.head.type, **head_options.model_dump(mode="json")}
    for section, key in (("dataset", "root"), ("backbone", "weights")):
        if data[section].get(key) is not None:
            data[section][key] = str(Path(data[section][key]).resolve())
    return data


def provenance(backbone: dict[str, str]) -> dict[str, Any]:
    """Versions of everything that shapes the numbers, and the identity of the backbone weights.

    timm's version is read from its metadata: a run whose features are all cached never imports timm.
    """
    from importlib.metadata import version

    from tlx import __version__, plugins

    return {
        "python": platform.python_version(),
        "tlx": __version__,
        "torch": torch.__version__,
        "timm": version("timm"),
        "plugins": {p.name: p.version for p in plugins.load().plugins if not p.builtin},
        "backbone": backbone,
    }


def write_run(
    out: Path,
    *,
    resolved: dict[str, Any],
    provenance: dict[str, Any],
    metrics: dict[str, Any],
    head: nn.Module,
    scores: Scores,
    chosen: dict[str, Any],
    painter: Painter,
    tuned_backbone: nn.Module | None = None,
) -> None:
    """Write every file of the run folder; ``metrics.json`` last, so its presence marks a finished run.

    A fine-tuned backbone is saved too (``backbone.safetensors``): its weights are no longer the
    pretrained ones the recipe names. ``painter`` draws the figures.
    """
    from safetensors.torch import save_file

    write_recipe(out / RECIPE_FILE, resolved)
    write_json(out / PROVENANCE_FILE, provenance)
    write_head(
        out / HEAD_FILE,
        head,
        classes=scores.classes,
        head_type=metrics["head"],
        feature_dim=metrics["feature_dim"],
    )
    if tuned_backbone is not None:
        state = {k: v.detach().contiguous() for k, v in tuned_backbone.state_dict().items()}
        save_file(state, str(out / TUNED_BACKBONE_FILE))
    write_rows(out / "history.csv", metrics["history"])
    write_rows(out / "per_class.csv", scores.per_class())
    painter.draw(out, metrics["history"], chosen, scores)
    write_json(out / "metrics.json", metrics)


def write_head(path: Path, head: nn.Module, *, classes: list[str], head_type: str, feature_dim: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    metadata = {"classes": json.dumps(classes), "head": head_type, "feature_dim": str(feature_dim)}
    save_file(state, str(path), metadata=metadata)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """A CSV with one column per key (the union, in first-seen order)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_recipe(path: Path, resolved: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")


@dataclass
class TrainedRun:
    """A run folder read back: the recipe, the rebuilt backbone, the trained head, the classes."""

    folder: Path
    recipe: Recipe
    backbone: Backbone
    head: nn.Module
    classes: list[str]

    def model(self) -> nn.Module:
        """Backbone and head as one module: normalized images (N, 3, H, W) → logits (N, classes)."""
        return nn.Sequential(self.backbone.module, self.head).eval()


def load_run(folder: Path, overrides: tuple[str, ...] = ()) -> TrainedRun:
    """Rebuild a run's classifier; the backbone's weights must be those the head was trained on."""
    from safetensors import safe_open

    from tlx import plugins
    from tlx.backbone import create_backbone, flip_averaged
    from tlx.run import options
    from tlx.weights import state_digest

    for name in (RECIPE_FILE, PROVENANCE_FILE, HEAD_FILE):
        if not (folder / name).is_file():
            raise TlxError(
                f"{folder}: not a finished tlx run folder ({name} is missing); pass the --out of tlx run"
            )
    recipe = load_recipe(folder / RECIPE_FILE, overrides)
    expected = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))["backbone"]["sha256"]
    registry = plugins.load()
    backbone_entry = registry.backbones.get(recipe.backbone.name, "backbone.name")
    head_entry = registry.heads.get(recipe.head.type, "head.type")
    head_options = options(
        head_entry, recipe.head.options, "head", str(folder / RECIPE_FILE), recipe.set_keys
    )
    backbone = create_backbone(backbone_entry, recipe.backbone)
    digest = state_digest(backbone.module)
    if digest != expected:
        raise TlxError(
            f"{folder / PROVENANCE_FILE}: the weights of backbone {recipe.backbone.name} have changed since "
            f"the run (sha256 {expected[:16]}…, now {digest[:16]}…); reinstall the weights the run used "
            "or train a new run"
        )
    if (folder / TUNED_BACKBONE_FILE).is_file():
        from safetensors.torch import load_file

        backbone.module.load_state_dict(load_file(str(folder / TUNED_BACKBONE_FILE)))
    elif recipe.extract.flip:
        backbone = flip_averaged(backbone)
    with safe_open(str(folder / HEAD_FILE), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    classes = json.loads(metadata["classes"])
    head = head_entry.factory(backbone.feature_dim, len(classes), head_options)
    head.load_state_dict(state)
    head.eval()
    return TrainedRun(folder, recipe, backbone, head, classes)
