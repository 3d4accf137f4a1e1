"""Fine-tuning: the backbone, or the modules named in ``finetune.unfreeze``, trained end to end with the head.

Frozen modules stay in eval mode, so their BatchNorm statistics remain those of pretraining; trained
modules are in train mode and update theirs. The backbone and the head have their own learning rates.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from tlx import notices
from tlx.data import Split, Splits, stratified_split
from tlx.errors import TlxError
from tlx.extraction.features import enforce_bad_image_policy
from tlx.extraction.pipeline import ImageFiles, collate_tensors
from tlx.extraction.preprocess import AsArray, eval_transform
from tlx.optim import Optimizer, make_loss, param_groups
from tlx.recipe import Recipe
from tlx.registry import Backbone
from tlx.tensors import to_backbone
from tlx.train import BestEpoch, ClosedFormHead, Epoch, Fit, check_finite, class_weights


@dataclass
class Finetuned:
    """The outcome of fine-tuning: the epochs and choices, the kept epoch's test images (paths, true
    classes, logits), the images that could not be decoded; with a validation split, what calibrates
    the run (:mod:`tlx.calibration`): the kept model's logits of the validation images and labels, and
    its penultimate features of the images it trained on and of the test images."""

    fit: Fit
    test_paths: list[Path]
    test_y: torch.Tensor
    test_logits: torch.Tensor
    skipped: list[tuple[Path, str]]
    held: tuple[torch.Tensor, torch.Tensor] | None = None
    train_features: torch.Tensor | None = None
    test_features: torch.Tensor | None = None


def unfreeze(module: nn.Module, names: str | list[str]) -> list[str]:
    """Make the parameters of ``module`` (``all``) or of its submodules ``names`` trainable.

    Returns the module names trained (``[""]`` for all of it). An unknown name is a :class:`TlxError`
    that lists the names available where it stopped matching.
    """
    prefixes = [""] if names == "all" else names
    for name in prefixes:
        try:
            module.get_submodule(name)
        except AttributeError:
            raise TlxError(
                f"finetune.unfreeze: the backbone has no module {name!r}; {_near(module, name)}"
            ) from None
    module.requires_grad_(False)
    for name in prefixes:
        module.get_submodule(name).requires_grad_(True)
    if not any(p.requires_grad for p in module.parameters()):
        raise TlxError(f"finetune.unfreeze: {', '.join(prefixes)} hold no parameters to train")
    return prefixes


def _near(module: nn.Module, name: str) -> str:
    """The children of the deepest module that ``name`` does reach, as a hint."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        try:
            parent = module.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        prefix = "".join(f"{p}." for p in parts[:depth])
        children = [f"{prefix}{child}" for child, _ in parent.named_children()]
        return f"it has {', '.join(children)}" if children else f"{prefix.rstrip('.')} has no submodules"
    return "see the backbone's module names"


def set_modes(module: nn.Module, trained: list[str], head: nn.Module) -> None:
    """Train mode for the trained modules and the head, eval mode (fixed BatchNorm statistics) elsewhere."""
    module.eval()
    for name in trained:
        module.get_submodule(name).train()
    head.train()


def training_transform(backbone: Backbone, augment: bool) -> Callable[[Image.Image], np.ndarray]:
    """Random resized crop and horizontal flip at the backbone's input size, then its normalization."""
    from timm.data import create_transform

    if not augment:
        return eval_transform(backbone.data_config)
    return AsArray(create_transform(**backbone.data_config, is_training=True, color_jitter=None))


def finetune(
    backbone: Backbone,
    head: nn.Module,
    splits: Splits,
    recipe: Recipe,
    *,
    device: str = "cpu",
    on_start: Callable[[Backbone, nn.Module, Recipe], None],
    on_epoch: Callable[[Epoch], None],
) -> Finetuned:
    """Train ``backbone.module`` (its unfrozen part) and ``head`` end to end on images of ``splits``.

    ``train.val_fraction`` holds out part of each training class; with ``train.patience`` training
    stops once the validation loss has not improved for that many epochs, and the weights of the best
    validation epoch are kept. ``train.class_weight`` weighs the loss. Training runs on ``device``
    (default the CPU); both modules are back on the CPU when it ends.
    """
    from tlx.extraction.device import batch_size

    if isinstance(head, ClosedFormHead):
        raise TlxError(
            f"head.type: {recipe.head.type} fits itself on fixed features and cannot be trained end to "
            "end; with strategy: finetune use a head trained by gradient (linear, mlp)"
        )
    config, options = recipe.train, recipe.finetune
    trained = unfreeze(backbone.module, options.unfreeze)
    on_start(backbone, head, recipe)
    fit_split, val_split = _hold_out(splits, config.val_fraction, recipe.seed)
    labels = torch.tensor([y for _, y in fit_split.samples])
    weight = class_weights(labels, len(splits.classes), config.class_weight)
    # channels-last is what convolution kernels are fastest with
    model = nn.Sequential(backbone.module, head).to(device, memory_format=torch.channels_last)
    decay = config.weight_decay
    groups = param_groups(backbone.module.named_parameters(), options.backbone_lr, decay)
    groups += param_groups(head.named_parameters(), config.lr, decay)
    loss_fn = make_loss(config, weight.to(device) if weight is not None else None)
    train_transform = training_transform(backbone, options.augment)
    train_loader = _loader(fit_split, train_transform, recipe, config.batch_size, device, shuffle=True)
    eval_size = batch_size(recipe.extract.batch_size, device)
    test_loader = _loader(
        splits.test, eval_transform(backbone.data_config), recipe, eval_size, device, shuffle=False
    )
    val_loader = None
    if val_split is not None:
        val_loader = _loader(
            val_split, eval_transform(backbone.data_config), recipe, eval_size, device, shuffle=False
        )
    optimizer = Optimizer(groups, config, steps_per_epoch=len(train_loader))
    rates = {"train.lr": config.lr, "finetune.backbone_lr": options.backbone_lr, "train.weight_decay": decay}
    skipped: dict[Path, str] = {}
    history: list[Epoch] = []
    best = BestEpoch(config.patience) if config.patience and val_loader is not None else None
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        set_modes(backbone.module, trained, head)
        train_loss, n_train = _train_epoch(
            model, notices.bar(train_loader, desc=f"epoch {epoch}", leave=False), fit_split, skipped,
            loss_fn, optimizer, device, recipe.extract.on_bad_image,
        )  # fmt: skip
        check_finite(epoch, train_loss, model.parameters(), rates)
        test_paths, test_y, test_logits, _ = _evaluate(model, test_loader, splits.test, skipped, device)
        val_scores: tuple[float | None, float | None] = (None, None)
        if val_loader is not None:
            _, val_y, val_logits, _ = _evaluate(model, val_loader, val_split, skipped, device)
            val_loss = loss_fn(val_logits.to(device), val_y.to(device)).item()
            val_scores = (val_loss, (val_logits.argmax(dim=1) == val_y).double().mean().item())
        enforce_bad_image_policy(skipped.items(), recipe.extract.on_bad_image)
        test_accuracy = (test_y == test_logits.argmax(dim=1)).double().mean().item()
        test_loss = loss_fn(test_logits.to(device), test_y.to(device)).item()
        seconds = time.perf_counter() - started
        record = Epoch(epoch, train_loss, test_accuracy, *val_scores, test_loss=test_loss, seconds=seconds)
        history.append(record)
        on_epoch(record)
        kept = (test_paths, test_y, test_logits)
        keep = lambda kept=kept: (copy.deepcopy(model.state_dict()), *kept)  # noqa: E731
        if best is not None and best.update(record, keep):
            break
    chosen = {}
    if best is not None:
        state, test_paths, test_y, test_logits = best.kept
        model.load_state_dict(state)
        chosen = {"epochs": best.epoch}
    n_val = len(val_split) if val_split else 0
    fit = Fit([h.as_dict() for h in history], n_train, n_val, chosen)
    if val_loader is None:
        model.eval().cpu()
        return Finetuned(fit, test_paths, test_y, test_logits, sorted(skipped.items()))
    # the kept model once more, without augmentation: what its calibration is fitted on
    plain = eval_transform(backbone.data_config)
    fit_loader = _loader(fit_split, plain, recipe, eval_size, device, shuffle=False)
    _, _, _, train_features = _evaluate(model, fit_loader, fit_split, skipped, device, features=True)
    _, val_y, val_logits, _ = _evaluate(model, val_loader, val_split, skipped, device)
    test_paths, test_y, test_logits, test_features = _evaluate(
        model, test_loader, splits.test, skipped, device, features=True
    )
    model.eval().cpu()
    return Finetuned(
        fit, test_paths, test_y, test_logits, sorted(skipped.items()),
        (val_logits, val_y), train_features, test_features,
    )  # fmt: skip


def _train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]],
    split: Split,
    skipped: dict[Path, str],
    loss_fn: nn.Module,
    optimizer: Optimizer,
    device: str,
    on_bad_image: str,
) -> tuple[float, int]:
    """One pass over the training batches: (mean loss, images trained on); failures go to ``skipped``."""
    total, n = 0.0, 0
    for images, indices, failures in batches:
        skipped |= {split.samples[i][0]: reason for i, reason in failures}
        enforce_bad_image_policy(skipped.items(), on_bad_image)
        if images is None:
            continue
        labels = torch.tensor([split.samples[i][1] for i in indices]).to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(to_backbone(images, device)), labels)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(indices)
        n += len(indices)
    if not n:
        raise TlxError(f"dataset: no image of split {split.name!r} could be decoded")
    return total / n, n


def _hold_out(splits: Splits, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """(fit, validation): ``fraction`` of each training class held out, by seed, each group
    (``dataset.group``) on one side; no validation at 0."""
    if not fraction:
        return splits.train, None
    return stratified_split(splits.train, splits.classes, fraction, seed, "train.val_fraction", "validation")


def _loader(
    split: Split, transform: Callable, recipe: Recipe, batch_size: int, device: str, *, shuffle: bool
) -> DataLoader:
    workers = recipe.extract.processes
    return DataLoader(
        ImageFiles(split.samples, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(recipe.seed) if shuffle else None,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate_tensors,
        pin_memory=device.startswith("cuda"),
        worker_init_fn=yield_to_backbone,
    )


def _evaluate(
    model: nn.Sequential,
    loader: DataLoader,
    split: Split,
    skipped: dict[Path, str],
    device: str,
    *,
    features: bool = False,
) -> tuple[list[Path], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Paths, true classes and logits of the images of ``split`` that could be decoded (on the CPU),
    and with ``features`` the backbone's (``model[0]``) pooled features of them."""
    model.eval()
    paths: list[Path] = []
    truth: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    with torch.inference_mode():
        for images, indices, failures in loader:
            skipped |= {split.samples[i][0]: reason for i, reason in failures}
            if images is None:
                continue
            paths += [split.samples[i][0] for i in indices]
            truth.append(torch.tensor([split.samples[i][1] for i in indices]))
            x = model[0](to_backbone(images, device))
            logits.append(model[1](x).float().cpu())
            if features:
                pooled.append(x.float().cpu())
    if not truth:
        raise TlxError(f"dataset: no image of split {split.name!r} could be decoded")
    return paths, torch.cat(truth), torch.cat(logits), torch.cat(pooled) if features else None


def yield_to_backbone(_: int) -> None:
    """A decoding worker's ``worker_init_fn``: run at the lowest priority (nice 19).

    Where the backbone's threads already use every core, a worker that preempts one of them stalls
    the others at the end of each layer; at the lowest priority a worker decodes in the gaps
    instead (bench/RESULTS.md has the figures).
    Spare cores still run the workers at full speed.
    """
    if hasattr(os, "nice"):
        os.nice(19)
