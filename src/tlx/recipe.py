"""Recipes: YAML files validated with pydantic, with ``--set KEY=VALUE`` overrides.

Relative paths in a recipe (``dataset.root``, ``backbone.weights``) are taken from the current
working directory, like paths given on the command line.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tlx.errors import TlxError


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A section whose extra keys are the options of a plugin component, validated later."""

    model_config = ConfigDict(extra="allow")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetConfig(_Open):
    kind: str = "imagefolder"


class BackboneConfig(_Strict):
    name: str
    pretrained: bool = True
    weights: Path | None = None


class HeadConfig(_Open):
    type: str = "linear"


class TrainConfig(_Strict):
    epochs: PositiveInt = 20
    lr: PositiveFloat = 0.001
    #: SGD momentum; AdamW's beta1
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: PositiveInt = 4
    optimizer: Literal["sgd", "adamw"] = "sgd"
    #: on weight matrices and kernels (not biases or normalization parameters)
    weight_decay: NonNegativeFloat = 0.0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_epochs: NonNegativeInt = 0
    #: schedule step: the learning rate is multiplied by gamma every step_size epochs
    step_size: PositiveInt = 7
    gamma: float = Field(0.1, gt=0, le=1)
    #: share of the training split held out (stratified, by seed) for early stopping and model choice
    val_fraction: float = Field(0.0, ge=0, lt=1)
    #: epochs without a better validation loss before training stops; needs val_fraction
    patience: PositiveInt | None = None
    #: ``balanced`` weighs each class's loss by n / (n_classes · n_class)
    class_weight: Literal["balanced"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise PydanticCustomError(
                "warmup",
                "warmup_epochs ({warmup}) must be fewer than epochs ({epochs})",
                {"warmup": self.warmup_epochs, "epochs": self.epochs},
            )
        if self.patience is not None and self.val_fraction == 0:
            raise ValueError("patience needs a validation split; set train.val_fraction, e.g. 0.2")
        return self


class FinetuneConfig(_Strict):
    """How ``strategy: finetune`` trains the backbone together with the head."""

    #: ``all``, or the backbone's module names to train (``[blocks.6, conv_head, bn2]``); the rest stays
    #: frozen and in eval mode (its BatchNorm statistics stay those of pretraining)
    unfreeze: Literal["all"] | list[str] = Field("all", min_length=1)
    #: learning rate of the backbone's parameters (the head's is train.lr)
    backbone_lr: PositiveFloat = 0.0001
    #: training-time augmentation from the backbone's data config: random resized crop and flip
    augment: bool = True


class ExtractConfig(_Strict):
    #: images per backbone call; None: 4 on a CPU, where small batches keep activations in cache,
    #: 64 on a GPU (bench/RESULTS.md)
    batch_size: PositiveInt | None = None
    #: processes that decode images and, for features, run the backbone on one thread each;
    #: None: one per core; 0 or 1: this process extracts features alone
    workers: NonNegativeInt | None = None
    #: backbone threads when this process extracts features alone; None: one per core
    threads: PositiveInt | None = None
    #: an image that cannot be decoded is left out and listed (skip), or stops the run (error)
    on_bad_image: Literal["skip", "error"] = "skip"
    #: average the features of each image and its mirror image (train, test and predict)
    flip: bool = False

    @property
    def processes(self) -> int:
        """``workers`` as set, else one per CPU core."""
        return cpu_cores() if self.workers is None else self.workers


class Recipe(_Strict):
    seed: int = 0
    #: features: the frozen backbone runs once and the head trains on its features;
    #: finetune: the backbone (or its ``finetune.unfreeze`` part) trains with the head
    strategy: Literal["features", "finetune"] = "features"
    #: where the backbone runs: auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N, mps
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    dataset: DatasetConfig
    backbone: BackboneConfig
    head: HeadConfig = HeadConfig()
    train: TrainConfig = TrainConfig()
    #: validated only when given, so that it can be refused with strategy: features
    finetune: FinetuneConfig = FinetuneConfig()
    extract: ExtractConfig = ExtractConfig()

    @model_validator(mode="after")
    def _flip_only_on_features(self) -> Recipe:
        if self.strategy == "finetune" and self.extract.flip:
            raise PydanticCustomError(
                "strategy",
                "extract.flip averages fixed features and does not apply to strategy: finetune "
                "(its training augmentation already flips); remove extract.flip",
            )
        return self

    @field_validator("finetune")
    @classmethod
    def _only_when_finetuning(cls, value: FinetuneConfig, info: ValidationInfo) -> FinetuneConfig:
        if info.data.get("strategy") != "finetune":
            raise PydanticCustomError(
                "strategy", "applies to strategy: finetune only; set strategy: finetune or remove it"
            )
        return value


def load_recipe(path: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is a one-line :class:`TlxError`."""
    data = read_yaml(path)
    set_keys = apply_overrides(data, overrides)
    return validate(Recipe, data, source=str(path), set_keys=set_keys)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TlxError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TlxError(f"{path}: cannot read the recipe ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        tag = f" {exc.problem.split('tag ')[-1]}" if exc.problem and "tag" in exc.problem else ""
        raise TlxError(
            f"{path}: line {exc.problem_mark.line + 1 if exc.problem_mark else '?'}: "
            f"unsupported YAML tag{tag}; recipes are plain YAML (mappings, lists, strings, numbers)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TlxError(f"{path}: not valid YAML: {where}{problem}") from None
    if data is None:
        raise TlxError(f"{path}: the recipe is empty; it needs at least dataset and backbone.name")
    if not isinstance(data, dict):
        raise TlxError(
            f"{path}: a recipe is a mapping of keys (dataset, backbone, head, train), "
            f"not a {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: tuple[str, ...]) -> set[str]:
    """Apply ``KEY=VALUE`` strings in place (values parsed as YAML); returns the keys set."""
    keys = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise TlxError(f"--set {item!r}: expected KEY=VALUE, for example --set train.epochs=5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise TlxError(f"--set {item!r}: {where} is a value, not a section with keys")
            node = child
        node[parts[-1]] = value
        keys.add(".".join(parts))
    return keys


def validate(
    model: type[BaseModel], data: Any, *, source: str, prefix: str = "", set_keys: set[str] = frozenset()
) -> Any:
    """Validate ``data`` with ``model``; the first error becomes a one-line :class:`TlxError`.

    ``prefix`` is the key path of ``data`` inside the recipe (``head`` for head options).
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = [str(p) for p in first["loc"]]
        key = ".".join(([prefix] if prefix else []) + loc)
        where = f"--set {key}" if key in set_keys else source
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(model, loc[:-1]), n=1, cutoff=0.5)
            hint = (
                f"; did you mean {'.'.join(([prefix] if prefix else []) + loc[:-1] + close)}?"
                if close
                else ""
            )
            raise TlxError(f"{where}: unknown key {key}{hint}{more}") from None
        if first["type"] == "missing":
            raise TlxError(f"{where}: missing required key {key}{more}") from None
        got = first.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict) else ""
        raise TlxError(f"{where}: {key}: {first['msg']}{shown}{more}") from None


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the sub-model at ``loc``, for suggesting a misspelled key."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
