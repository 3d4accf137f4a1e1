"""The Python API: :func:`fit` trains a run as ``tlx run`` does; :func:`load` reads one back as a
:class:`Classifier` that gives the same numbers as ``tlx predict``.

For notebooks and services: ``fit`` prints nothing by default and keeps the warnings on the
:class:`Run` it returns. Nothing here imports torch until it is called.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tlx.errors import TlxError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from tlx.artifacts import TrainedRun
    from tlx.audits import Audit
    from tlx.predict import Source
    from tlx.recipe import Recipe

    #: one image file or folder, one in-memory image (PIL, or a numpy array H×W[×C] of uint8), or several
    ImageLike = str | Path | Image.Image | np.ndarray
    Images = ImageLike | Iterable[ImageLike]

#: what stands for a recipe file's name where there is no file (the run folder's name, error messages)
IN_MEMORY = "recipe"


@dataclass(frozen=True)
class Run:
    """A finished run: its folder (as ``tlx run`` writes it), its ``metrics.json``, and the warnings
    that a quiet :func:`fit` kept instead of printing."""

    folder: Path
    metrics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    #: the cache folder the run used (None: the default one)
    cache_dir: Path | None = None

    def load(self) -> Classifier:
        """The run's classifier (see :func:`load`), with the run's cache folder."""
        return load(self.folder, cache_dir=self.cache_dir)

    def __repr__(self) -> str:
        """One line: the folder, backbone, head and test accuracy (the metrics are on :attr:`metrics`)."""
        backbone, head = self.metrics["backbone"]["name"], self.metrics["head"]
        accuracy = self.metrics["test_accuracy"]
        return (
            f"Run({str(self.folder)!r}, backbone={backbone!r}, head={head!r}, test_accuracy={accuracy:.4f})"
        )


class Prediction(NamedTuple):
    """The most probable class of one image, and its calibrated probability; whether the image looks
    like one of the classes at all (``known``, from ``ood_score`` and the run's threshold; None for a
    run without calibration, or with ``reject=False``)."""

    label: str
    probability: float
    known: bool | None = None
    ood_score: float | None = None


class Classifier:
    """A trained run's backbone and head: class probabilities of image files, folders, PIL images and
    numpy arrays (H×W×C uint8, as ``PIL.Image.fromarray`` takes them; N×H×W×C for a batch).

    In-memory images are decoded by the rules of image files (EXIF orientation, modes to RGB) and
    preprocessed alike; a folder stands for its images in sorted order, searched recursively, as
    ``tlx predict`` lists them. Progress bars are not drawn.
    """

    def __init__(self, run: TrainedRun) -> None:
        self._run = run

    @property
    def folder(self) -> Path:
        """The run folder the classifier was read from."""
        return self._run.folder

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of :meth:`predict_proba`'s columns."""
        return list(self._run.classes)

    def predict(self, images: Images, *, reject: bool = True) -> list[Prediction]:
        """``(label, probability, known, ood_score)`` of the most probable class, per image; an image
        that cannot be decoded is a TlxError. ``reject=False``: no "unknown" (``known`` is None)."""
        results, skipped = self._answers(images, 1, reject, None)
        if skipped:
            name, reason = skipped[0]
            raise TlxError(f"{name}: cannot decode the image ({reason}); pass only images")
        return [Prediction(r["label"], r["probability"], r.get("known"), r.get("ood_score")) for r in results]

    def predict_proba(self, images: Images) -> np.ndarray:
        """Class probabilities, one row per image (n, classes), float32."""
        return self._probabilities(images).numpy()

    def top_k(
        self, images: Images, k: int = 5, *, reject: bool = True, coverage: float | None = None
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """The ``k`` most probable classes of each image that decodes, as ``tlx predict --json`` lists
        them (``path`` (None for an image in memory), ``label``, ``probability``, ``top_k``, and with
        the run's calibration ``known``, ``ood_score``, and for a ``coverage`` the ``prediction_set``),
        and ``(path, reason)`` of each that does not: a batch job goes on past a bad file."""
        return self._answers(images, k, reject, coverage)

    def _answers(
        self, images: Images, k: int, reject: bool, coverage: float | None
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        from tlx import notices
        from tlx.predict import predict

        if coverage is not None and not 0 < coverage < 1:
            raise TlxError(f"coverage: {coverage} is not a share between 0 and 1; try 0.9")
        with notices.collected([]):
            results, skipped = predict(self._run, _sources(images), top_k=k, reject=reject, coverage=coverage)
        return results, [(_name(source), reason) for source, reason in skipped]

    def _probabilities(self, images: Images) -> Any:
        import torch

        from tlx import notices
        from tlx.predict import probabilities

        sources = _sources(images)
        if not sources:
            return torch.empty(0, len(self._run.classes))
        with notices.collected([]):
            _, result, skipped = probabilities(self._run, sources)
        if skipped:
            source, reason = skipped[0]
            raise TlxError(f"{_name(source)}: cannot decode the image ({reason}); pass only images")
        return result

    def __repr__(self) -> str:
        return f"Classifier({str(self.folder)!r}, classes={self.classes!r})"


def fit(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = True,
) -> Run:
    """Train ``recipe`` and write its run folder, as ``tlx run RECIPE --set ... --out OUT`` does.

    ``recipe`` is a recipe file or a bundled recipe's name (``"hymenoptera-lite0"``, ``tlx recipes``),
    a dict of the same keys (validated alike; relative paths are taken from the current folder) or a
    :class:`tlx.Recipe`. ``overrides`` are ``KEY=VALUE`` strings as
    ``--set`` takes them, or a dict ``{KEY: VALUE}``. ``out`` is the run folder (default: a new folder
    under ``runs/``), locked while the run lives. ``quiet`` prints nothing, progress bars included;
    the warnings are kept in :attr:`Run.warnings`. ``quiet=False`` prints as ``tlx run`` does, its
    progress bars tqdm's notebook widgets in Jupyter. A problem with the input is a :class:`tlx.TlxError`.
    """
    from tlx import notices
    from tlx.plots import Painter

    with Painter() as painter:  # first: it imports matplotlib while this process imports the rest
        from tlx.artifacts import run_folder
        from tlx.report import Console, QuietConsole
        from tlx.run import run

        loaded, source = _recipe(recipe, _overrides(overrides))
        kept: list[str] = []
        with ExitStack() as stack:
            if quiet:
                stack.enter_context(notices.collected(kept))
                caught = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
            folder = stack.enter_context(run_folder(None if out is None else Path(out), Path(source)))
            console = QuietConsole(kept) if quiet else Console()
            cache = None if cache_dir is None else Path(cache_dir)
            metrics = run(loaded, source, folder, cache, painter, console)
            if quiet:
                kept += dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)
    return Run(folder, metrics, kept, cache)


def audit(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = True,
    near_threshold: float | None = None,
) -> Audit:
    """Audit a recipe's data as ``tlx audit RECIPE --set ... --out OUT`` does: label issues,
    duplicates and leakage, outliers, clean manifests (see :mod:`tlx.audits`); ``recipe`` and
    ``overrides`` as :func:`fit` takes them; ``near_threshold`` as ``--near-threshold``. Returns the
    folder and what ``audit.json`` holds."""
    from tlx.audits import audit as run_audit
    from tlx.report import Console, QuietConsole

    loaded, source = _recipe(recipe, _overrides(overrides))
    console = QuietConsole() if quiet else Console()
    cache = None if cache_dir is None else Path(cache_dir)
    return run_audit(loaded, source, None if out is None else Path(out), cache, console, near_threshold)


def load(
    run_dir: str | Path, *, cache_dir: str | Path | None = None, overrides: Iterable[str] = ()
) -> Classifier:
    """The classifier of a run folder (``tlx.fit``'s or ``tlx run``'s), rebuilt offline; its backbone
    is recalled from, and image features kept in, the cache folder (``cache_dir``) as a run does.
    ``overrides``: ``extract.*`` and ``device`` keys as ``--set`` takes them (``device=cpu``)."""
    from tlx.artifacts import load_run
    from tlx.evaluate import check_overrides

    overrides = tuple(overrides)
    check_overrides(overrides)
    cache = None if cache_dir is None else Path(cache_dir)
    return Classifier(load_run(Path(run_dir), overrides, cache))


def _recipe(
    recipe: str | Path | Mapping[str, Any] | Recipe, overrides: tuple[str, ...]
) -> tuple[Recipe, str]:
    """The validated recipe, with ``overrides`` applied, and the name its errors go by."""
    from tlx.recipe import Recipe, load_recipe, make_recipe

    if isinstance(recipe, str | Path):
        return load_recipe(Path(recipe), overrides), str(recipe)
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe, IN_MEMORY
        data = recipe.model_dump(exclude_unset=True)  # unset: defaults stay defaults, as in a file
    elif isinstance(recipe, Mapping):
        data = copy.deepcopy(dict(recipe))  # overrides are applied in place: not to the caller's dict
    else:
        raise TypeError(f"recipe: expected a file path, a dict or a tlx.Recipe, not {type(recipe).__name__}")
    return make_recipe(data, overrides, source=IN_MEMORY), IN_MEMORY


def _overrides(overrides: Iterable[str] | Mapping[str, Any] | None) -> tuple[str, ...]:
    """``KEY=VALUE`` strings; a dict's values written as JSON, which YAML reads back unchanged."""
    if overrides is None:
        return ()
    if isinstance(overrides, str):
        return (overrides,)
    if isinstance(overrides, Mapping):
        return tuple(f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items())
    return tuple(overrides)


#: what the image arguments of :class:`Classifier` take, in words
ACCEPTED = "a file or folder path, a PIL image or a numpy uint8 array H×W, H×W×3 or H×W×4"


def _sources(images: Images) -> list[Source]:
    """One list of files, folders and in-memory images, whichever ``images`` is; else a TlxError.

    A numpy array of 2 or 3 dimensions is one image, of 4 a batch (N×H×W×C), as PIL reads arrays.
    """
    import numpy as np
    from PIL import Image

    if isinstance(images, str | os.PathLike | Image.Image) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3)
    ):
        images = [images]
    elif isinstance(images, bytes | bytearray | memoryview) or not isinstance(images, Iterable):
        raise TlxError(f"images: expected {ACCEPTED}, or a list of them, not {_kind(images)}")
    return [_source(item, f"images[{i}]") for i, item in enumerate(images)]


def _source(item: Any, where: str) -> Source:
    """One image argument as a path or a PIL image."""
    import numpy as np
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str | os.PathLike):
        return Path(item)
    if isinstance(item, np.ndarray):
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[:, :, 0]
        if item.dtype == np.uint8 and (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
            return Image.fromarray(np.ascontiguousarray(item))
        raise TlxError(
            f"{where}: a numpy array of {item.dtype} with shape {item.shape} is not an image; pass "
            "uint8 values of shape H×W, H×W×3 (RGB) or H×W×4 (RGBA)"
        )
    raise TlxError(f"{where}: expected {ACCEPTED}, not {_kind(item)}")


def _kind(value: Any) -> str:
    """A value's type in words; bytes get a hint, since they are a common mistake."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes (decode them first: PIL.Image.open(io.BytesIO(data)))"
    return "None" if value is None else type(value).__name__


def _name(source: Source) -> str:
    """A file's path, or an in-memory image as its mode and size."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return f"in-memory image ({source.mode} {source.width}×{source.height})"
    return str(source)
