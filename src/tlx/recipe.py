"""Recipes: YAML files validated with pydantic, with ``--set KEY=VALUE`` overrides.

A recipe argument is a file, or the name of a recipe bundled with tlx (:data:`BUNDLED`,
``tlx recipes``): a file that exists wins. Relative paths in a recipe (``dataset.root``,
``backbone.weights``) are taken from the current working directory, a bundled recipe's too, and ``~`` is
the home folder, as with paths given on the command line.

The loader is bounded (:data:`MAX_BYTES`, :data:`MAX_VALUES`, :data:`MAX_DEPTH`) so that a small
document cannot expand into a huge one: a recipe is a few hundred bytes.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tlx.errors import TlxError, shorten

#: the largest recipe file in bytes, and the longest ``--set`` value in characters
MAX_BYTES = 1 << 20
#: the most values (mappings, lists and scalars) in a recipe or a ``--set`` value; each use of an
#: alias counts the values of its anchor again, as the loaded data holds them
MAX_VALUES = 10_000
#: the deepest nesting of mappings and lists (and of the parts of a ``--set`` key)
MAX_DEPTH = 32
#: the largest seed: random, torch and a signed 64-bit integer all take 0 .. 2**63 - 1
MAX_SEED = 2**63 - 1


def _expand_user(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded to that home folder, as a shell does."""
    try:
        return path.expanduser()
    except RuntimeError:
        user = shorten(path.parts[0])
        raise ValueError(f"cannot expand {user}: no home folder known for that user") from None


#: a path option: ``~`` is the home folder; plugins use it for their own path options too
UserPath = Annotated[Path, AfterValidator(_expand_user)]


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Strict(BaseModel):
    """A section with only its own keys; a number must be finite (``.inf`` or ``.nan`` trains nothing)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
    weights: UserPath | None = None


class HeadConfig(_Open):
    type: str = "linear"


class TrackConfig(_Open):
    """One experiment tracker: its registered ``kind`` and that tracker's own options."""

    kind: str


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


class CalibrationConfig(_Strict):
    """How a run's answers are calibrated (:mod:`tlx.calibration`)."""

    #: the share of held-out training images the "unknown" threshold accepts as known
    accept: float = Field(0.95, gt=0, lt=1)


class EngineConfig(_Open):
    """Where the backbone runs over the images: a registered engine ``kind`` and that engine's options."""

    kind: str = "local"


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
    #: what runs the frozen backbone: auto (ONNX Runtime on a CPU when installed, else torch), torch,
    #: or onnxruntime (see tlx.extraction.runtimes)
    runtime: Literal["auto", "torch", "onnxruntime"] = "auto"
    #: where the backbone runs (``tlx list`` shows the engines); never part of the feature cache key
    engine: EngineConfig = EngineConfig()

    @property
    def processes(self) -> int:
        """``workers`` as set, else one per CPU core."""
        return cpu_cores() if self.workers is None else self.workers


class Recipe(_Strict):
    """A validated recipe: every key of a recipe file, each with its default (the docs' page "Recipes
    and keys" lists them). :func:`tlx.fit` takes one as it takes a recipe file or a dict."""

    seed: int = Field(0, ge=0, le=MAX_SEED)
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
    calibration: CalibrationConfig = CalibrationConfig()
    extract: ExtractConfig = ExtractConfig()
    #: experiment trackers that follow the run (``tlx list`` shows the kinds)
    track: list[TrackConfig] = []
    _set_keys: frozenset[str] = PrivateAttr(frozenset())

    @property
    def set_keys(self) -> frozenset[str]:
        """The keys given with ``--set``: a later check of a plugin's options blames them, not the file."""
        return self._set_keys

    @model_validator(mode="after")
    def _features_only_keys(self) -> Recipe:
        if self.strategy == "finetune" and self.extract.flip:
            raise PydanticCustomError(
                "strategy",
                "extract.flip averages fixed features and does not apply to strategy: finetune "
                "(its training augmentation already flips); remove extract.flip",
            )
        if self.strategy == "finetune" and self.extract.runtime == "onnxruntime":
            raise PydanticCustomError(
                "strategy",
                "extract.runtime: onnxruntime runs a frozen backbone; strategy: finetune trains and "
                "predicts in torch: remove extract.runtime or set it to auto",
            )
        if self.strategy == "finetune" and self.extract.engine.kind != "local":
            raise PydanticCustomError(
                "strategy",
                "extract.engine runs a frozen backbone and does not apply to strategy: finetune "
                "(it trains the backbone on this machine); remove extract.engine",
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


#: the folder of the recipes that ship inside the package, ``NAME.yaml`` each
BUNDLED = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class BundledRecipe:
    """A recipe shipped with tlx: ``tlx run NAME`` runs it."""

    name: str
    #: the recipe's first comment line
    description: str
    path: Path


def bundled_recipes() -> list[BundledRecipe]:
    """The bundled recipes, by name."""
    found = []
    for path in sorted(BUNDLED.glob("*.yaml"), key=lambda p: p.stem):
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        description = first.removeprefix("#").strip() if first.startswith("#") else ""
        found.append(BundledRecipe(path.stem, description, path))
    return found


def find_recipe(recipe: str | Path) -> Path:
    """The file of the recipe argument ``recipe``: an existing file, else the bundled recipe of that
    name (``.yaml`` optional). A name that is neither is a :class:`TlxError` listing the bundled names;
    a missing path with a folder in it is returned as it is, for :func:`read_yaml` to report."""
    path = Path(recipe)
    if path.is_file() or len(path.parts) != 1:
        return path
    bundled = {r.name: r.path for r in bundled_recipes()}
    name = path.name.removesuffix(".yaml")
    if name in bundled:
        return bundled[name]
    close = difflib.get_close_matches(name, bundled, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise TlxError(
        f"{shorten(str(recipe))}: no such recipe file, and no bundled recipe of that name "
        f"(bundled: {', '.join(bundled)}){hint}"
    )


def load_recipe(path: str | Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate the recipe ``path`` (a file or a bundled name, :func:`find_recipe`);
    every problem is a one-line :class:`TlxError`."""
    data = read_yaml(find_recipe(path))
    if SWEEP in data:
        raise TlxError(
            f"{path}: {SWEEP}: this recipe is a sweep; run it with `tlx sweep {path}`, "
            f"or remove the {SWEEP} section to run it once"
        )
    return make_recipe(data, overrides, source=str(path))


def make_recipe(data: dict[str, Any], overrides: tuple[str, ...] = (), *, source: str) -> Recipe:
    """Override (in place) and validate recipe data read from ``source``, as :func:`load_recipe` does."""
    return recipe_from(data, source, apply_overrides(data, overrides))


def recipe_from(data: dict[str, Any], source: str, set_keys: Collection[str] = ()) -> Recipe:
    """Validate recipe ``data`` read from ``source``; ``set_keys`` were given with ``--set``."""
    recipe = validate(Recipe, data, source=source, set_keys=set_keys)
    recipe._set_keys = frozenset(set_keys)
    return recipe


#: the recipe section ``tlx sweep`` reads (``--grid`` fills it in): recipe keys mapped to lists of values
SWEEP = "sweep"


def load_sweep(
    path: str | Path, overrides: tuple[str, ...] = (), grid: dict[str, list[Any]] | None = None
) -> tuple[dict[str, Any], set[str], dict[str, list[Any]]]:
    """A sweep recipe: its data without the sweep section, ``--set`` applied; the keys set; the grid.

    ``grid`` (from ``--grid`` or the Python API) adds to the recipe's ``sweep`` section and wins over
    it key by key. Every key must name a recipe key and every list must hold a value.
    """
    data = read_yaml(find_recipe(path))
    section = data.pop(SWEEP, None) or {}
    if not isinstance(section, dict):
        raise TlxError(
            f"{path}: {SWEEP}: expected a mapping of recipe keys to lists of values, "
            f"e.g. {SWEEP}: {{head.type: [linear, mlp]}}"
        )
    set_keys = apply_overrides(data, overrides)
    for key, values in section.items():
        check_grid_key(str(key), values, f"{path}: {SWEEP}.{shorten(str(key))}")
    for key, values in (grid or {}).items():
        check_grid_key(key, values, f"--grid {shorten(key)}")
    merged = {str(k): list(v) for k, v in section.items()}
    merged.update({k: list(v) for k, v in (grid or {}).items()})
    return data, set_keys, merged


def check_grid_key(key: str, values: Any, where: str) -> None:
    """A grid entry names a recipe key (the closest one is suggested) and holds a non-empty list of
    distinct values."""
    parts = key.split(".")
    if not all(parts):
        raise TlxError(f"{where}: expected a dotted recipe key, e.g. head.type")
    model: type[BaseModel] = Recipe
    for depth, part in enumerate(parts):
        if issubclass(model, _Open):
            break  # a component's own options: checked with the component's model per combination
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.5)
            prefix = ".".join(parts[:depth])
            hint = f"; did you mean {'.'.join(filter(None, [prefix, close[0]]))}?" if close else ""
            raise TlxError(f"{where}: unknown key {shorten('.'.join(parts[: depth + 1]))}{hint}")
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            if depth < len(parts) - 1:
                raise TlxError(f"{where}: {'.'.join(parts[: depth + 1])} is a value, not a section with keys")
            break
        model = annotation
    if not isinstance(values, list):
        raise TlxError(
            f"{where}: expected a list of values, e.g. [linear, mlp] (got {shorten(repr(values))})"
        )
    if not values:
        raise TlxError(f"{where}: an empty list; give one value or more, e.g. --grid head.type=linear,mlp")
    repeated = [value for n, value in enumerate(values) if value in values[:n]]
    if repeated:
        raise TlxError(f"{where}: {shorten(str(repeated[0]))} is given twice; give each value once")


def parse_grid(items: tuple[str, ...]) -> dict[str, list[Any]]:
    """``KEY=V1,V2,...`` strings as ``{KEY: [V1, V2, ...]}``; the values are read as a YAML flow list.

    So ``head.hidden=[256],[512]`` gives two lists; a text that is not YAML is split at its commas. A key
    given again adds its values (``head.type=linear`` and ``head.type=mlp`` try both). Each item is
    checked with :func:`check_grid_key`, and :func:`load_sweep` checks each key's values together.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TlxError(
                f"--grid {shorten(repr(item))}: expected KEY=V1,V2,..., "
                "for example --grid head.type=linear,mlp"
            )
        shown = shorten(key.strip())
        if len(raw) > MAX_BYTES:
            raise TlxError(f"--grid {shown}: the values are longer than {MAX_BYTES} characters")
        try:
            values = _parse(f"[{raw}]")
        except _Limit as exc:
            raise TlxError(f"--grid {shown}: {exc.problem}") from None
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list):  # not YAML, or brackets that close the list early
            values = [v.strip() for v in raw.split(",")] if raw.strip() else []
        check_grid_key(key.strip(), values, f"--grid {shown}")
        grid[key.strip()] = grid.get(key.strip(), []) + values
    return grid


def dotted(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (recipe data) as one mapping of dotted keys, ``train.lr``; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(dotted(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def assign(data: dict[str, Any], key: str, value: Any, flag: str = "--set") -> None:
    """Set the dotted ``key`` of recipe ``data`` to ``value``, creating the sections on the way."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = shorten(".".join(parts[: depth + 1]))
            raise TlxError(f"{flag} {shorten(key)}: {where} is a value, not a section with keys")
        node = child
    node[parts[-1]] = value


class _Limit(Exception):
    """A document past one of the loader's bounds, at ``line`` (1-based); ``problem`` says what to do."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(line, problem)
        self.line, self.problem = line, problem


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops while composing at :data:`MAX_DEPTH` or :data:`MAX_VALUES`.

    Each use of an alias adds the values of its anchor, so that nested aliases ("billion laughs")
    are refused after reading a few hundred bytes rather than expanded in memory; an alias inside
    its own anchor (an endless value) is refused too.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values = 0
        self._sizes: dict[int, int] = {}  # values of each finished node, by id, for its aliases

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            anchor = self.anchors.get(event.anchor)
            if anchor is not None:
                if id(anchor) not in self._sizes:
                    name = shorten(event.anchor, 40)
                    raise _Limit(line, f"alias *{name} is inside its own anchor, an endless value; remove it")
                self._count(self._sizes[id(anchor)], line)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Limit(line, f"nested more than {MAX_DEPTH} levels deep; a recipe needs three or four")
        before = self._values
        self._count(1, line)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._values - before
        return node

    def _count(self, values: int, line: int) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise _Limit(
                line,
                f"more than {MAX_VALUES} values, each use of an alias counting as a copy of its anchor; "
                "a recipe needs a few dozen",
            )


def _parse(text: str) -> Any:
    """``text`` as plain YAML data, within the loader's bounds (:class:`_Limit` past them)."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the recipe file ``path``, read within the loader's bounds."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_BYTES + 1)  # no more: the file may be huge, or endless
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise TlxError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TlxError(f"{path}: cannot read the recipe ({exc})") from None
    if len(raw) > MAX_BYTES:
        raise TlxError(
            f"{path}: larger than {MAX_BYTES} bytes, the most a recipe may have; "
            "is it the right file? (a recipe is a few hundred bytes)"
        )
    try:
        data = _parse(text)
    except _Limit as exc:
        raise TlxError(f"{path}: line {exc.line}: {exc.problem}") from None
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
            raise TlxError(
                f"--set {shorten(repr(item))}: expected KEY=VALUE, for example --set train.epochs=5"
            )
        shown = shorten(".".join(parts))
        if len(parts) > MAX_DEPTH:
            raise TlxError(f"--set {shown}: a key of more than {MAX_DEPTH} parts; recipe keys have a few")
        if len(raw) > MAX_BYTES:
            raise TlxError(
                f"--set {shown}: the value is longer than {MAX_BYTES} characters, the most a --set "
                "may give; a recipe value is a few"
            )
        try:
            value = _parse(raw) if raw.strip() else raw
        except _Limit as exc:
            raise TlxError(f"--set {shown}: {exc.problem}") from None
        except yaml.YAMLError:
            value = raw  # not YAML: the text itself, as for a path with odd characters
        assign(data, ".".join(parts), value)
        keys.add(".".join(parts))
    return keys


def validate(
    model: type[BaseModel],
    data: Any,
    *,
    source: str,
    prefix: str = "",
    set_keys: Collection[str] = frozenset(),
    elsewhere: Callable[[str], str] | None = None,
) -> Any:
    """Validate ``data`` with ``model``; the first error becomes a one-line :class:`TlxError`.

    ``prefix`` is the key path of ``data`` inside the recipe (``head`` for head options); an error
    at, under or above a key in ``set_keys`` names that ``--set`` rather than ``source``.
    ``elsewhere(key)``: for an unknown key with no close match, a hint naming what does take it.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = [str(p) for p in first["loc"]]
        key = ".".join(([prefix] if prefix else []) + loc)
        where = _blame(key, set_keys, source)
        key = shorten(key)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        if first["type"] == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            if prefix and len(loc) == 1:  # a component's options sit beside its section's own keys
                known += _fields_at(Recipe, prefix.split("."))
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
            if close:
                hint = f"; did you mean {shorten('.'.join(([prefix] if prefix else []) + loc[:-1] + close))}?"
            else:
                hint = elsewhere(loc[-1]) if elsewhere is not None and len(loc) == 1 else ""
            raise TlxError(f"{where}: unknown key {key}{hint}{more}") from None
        if first["type"] == "missing":
            raise TlxError(f"{where}: missing required key {key}{more}") from None
        got = first.get("input")
        shown = f" (got {shorten(repr(got))})" if not isinstance(got, dict) else ""
        raise TlxError(f"{where}: {key}: {first['msg']}{shown}{more}") from None


def _blame(key: str, set_keys: Collection[str], source: str) -> str:
    """``--set K`` for the set key ``K`` that is ``key`` or contains or lies under it, else ``source``."""
    related = [
        k for k in set_keys if key and (k == key or f"{key}.".startswith(f"{k}.") or k.startswith(f"{key}."))
    ]
    return f"--set {shorten(min(related, key=lambda k: (k != key, k)))}" if related else source


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the sub-model at ``loc``, for suggesting a misspelled key."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
