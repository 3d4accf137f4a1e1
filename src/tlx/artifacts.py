"""The run folder: everything needed to trust, inspect and reuse a trained classifier, offline.

Written by ``tlx run``; read back by ``tlx predict``, ``tlx eval`` and ``tlx export``:

- ``recipe.yaml``      the recipe with every default filled in (component options too), paths absolute
- ``provenance.json``  versions of Python, tlx, torch, timm and each plugin; the backbone weights' SHA-256;
  the recipe file's name and when the run was trained;
  the SHA-256 of each file a run is loaded from (recipe, head, fine-tuned backbone), checked on load
- ``metrics.json``     final scores, the training history, the choices made on the training split
- ``history.csv``      one row per epoch (or per L2 strength for a closed-form head)
- ``head.safetensors`` the trained head, with the class names, head type and feature size as metadata
- ``backbone.safetensors`` the trained backbone, for ``strategy: finetune`` only
- ``per_class.csv``    precision, recall, F1 and support of each class on the test split
- ``predictions.csv``  each test image: path, true and predicted label, the probability of each class
- ``curves.png``, ``confusion.png``, ``errors.png`` (the most confident mistakes on the test split),
  ``reliability.png`` (calibration on the test split, where the run is calibrated)

Every file is written atomically (:func:`tlx.files.write_atomic`): a reader never sees half of one. While
a run lives it holds a lock on ``.tlx-run.lock`` in its folder, so a second run cannot write into the
same folder; the file stays beside what the run wrote, marking the folder as tlx's (a sweep runs a
damaged or stale child again in it). A run writes into no other existing folder that holds files.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from tlx import notices
from tlx.components import Components
from tlx.data import RUN_MARKER, Split
from tlx.errors import TlxError, describe, shorten
from tlx.files import FILE_MODE, write_atomic, write_json
from tlx.plots import Painter
from tlx.recipe import Recipe, load_recipe
from tlx.runfiles import (
    CALIBRATION_FILE,
    HEAD_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    PROVENANCE_FILE,
    RECIPE_FILE,
    RESTORE,
    TUNED_BACKBONE_FILE,
    HeadMetadata,
    check_digests,
    checked,
    digests,
    read_provenance,
)
from tlx.scores import Scores

if TYPE_CHECKING:  # torch is imported where it is used: opening a run folder needs none
    import torch
    from torch import nn

    from tlx.calibration import Calibration
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.extraction.store import BackboneInfo
    from tlx.tensors import Features

LOCK_FILE = RUN_MARKER
#: the most misclassified test images ``errors.png`` shows
GALLERY_SIZE = 16


@dataclass
class Predictions:
    """The classifier on the test split: each decoded image's path, true class and class probabilities.

    The predicted class is the most probable one; the run's scores are computed from it, so the rows of
    ``predictions.csv`` agree with ``metrics.json``.
    """

    paths: list[Path]
    truth: torch.Tensor  # (n,) int64
    probabilities: torch.Tensor  # (n, classes) float32, softmax of the head's logits

    @classmethod
    def of(cls, paths: list[Path], truth: torch.Tensor, logits: torch.Tensor) -> Predictions:
        import torch

        return cls(paths, truth, torch.softmax(logits.float(), dim=1))

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)

    def mistakes(self, classes: list[str], limit: int = GALLERY_SIZE) -> list[dict[str, Any]]:
        """Up to ``limit`` misclassified images, the most confident first (then in test-split order)."""
        truth, predicted = self.truth.tolist(), self.predicted.tolist()
        confidence = self.probabilities.max(dim=1).values.tolist()
        wrong = [i for i, (t, p) in enumerate(zip(truth, predicted)) if t != p]
        wrong.sort(key=lambda i: -confidence[i])  # stable: ties keep the split's order
        return [
            {
                "path": str(self.paths[i]),
                "true": classes[truth[i]],
                "predicted": classes[predicted[i]],
                "probability": confidence[i],
            }
            for i in wrong[:limit]
        ]


def new_run_folder(recipe_path: Path, parent: Path = Path("runs")) -> Path:
    """Create ``parent/<timestamp>-<recipe name>``, or with ``-2``, ``-3``… where that is taken.

    ``mkdir`` without ``exist_ok`` either creates the folder or fails: two runs started in the same
    second never share one.
    """
    base = parent / f"{datetime.now():%Y%m%d-%H%M%S}-{recipe_path.stem}"
    out, n = base, 1
    while True:
        try:
            out.mkdir(parents=True)  # the parents as with exist_ok; the folder itself must be new
            return out
        except FileExistsError:
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        except OSError as exc:
            raise TlxError(
                f"cannot create a run folder in {parent} ({exc.strerror or exc}); pass --out FOLDER"
            ) from None


def refuse_finished(out: Path) -> None:
    """A folder that holds a finished run (``metrics.json``) is never written into again."""
    if (out / METRICS_FILE).exists():
        raise TlxError(f"--out: {out} already holds a run ({METRICS_FILE}); choose another folder")


def refuse_foreign(out: Path) -> None:
    """A run writes only into a new or empty folder, or one an unfinished tlx run left (its lock file).

    Anything else may hold the user's own files (``--out .`` in a project folder holds the recipe
    being read): nothing in it is touched.
    """
    try:
        names = sorted(p.name for p in out.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return  # created below, or refused there as not a folder
    except OSError:
        return  # unreadable: refused below as unwritable
    if names and LOCK_FILE not in names:
        raise TlxError(
            f"--out: {out} already holds files tlx did not write there ({len(names)}, first: "
            f"{shorten(names[0], 60)}); a run writes only into a new or empty folder: choose another"
        )


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` before any heavy work; refuse an earlier run, other files, an unwritable folder."""
    refuse_finished(out)
    refuse_foreign(out)
    writable_folder(out)


def writable_folder(out: Path) -> None:
    """Create the folder ``out`` and check that a file can be written in it; else a TlxError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise TlxError(
            f"--out: cannot write to {out} ({exc.strerror or exc}); choose another folder"
        ) from None


@contextlib.contextmanager
def run_folder(out: Path | None, recipe_path: Path) -> Iterator[Path]:
    """Hold a run folder for a run's life: ``out``, else a new one (:func:`new_run_folder`).

    The folder is locked (``flock`` on :data:`LOCK_FILE`), so a second run given the same ``--out`` is
    refused while this one lives; the OS drops the lock when the process ends, even by ``kill -9``.
    A run that stops before writing anything leaves no folder it created.
    """
    created = out is None or not out.exists()
    folder = new_run_folder(recipe_path) if out is None else out
    try:
        prepare_out_dir(folder)
        with _locked(folder):
            refuse_finished(folder)  # a run that held the folder may have finished meanwhile
            yield folder
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder/LOCK_FILE``; removed when released."""
    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise TlxError(
                f"--out: cannot write to {folder} ({exc.strerror or exc}); choose another folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise TlxError(
                f"--out: {folder} is in use by another tlx run (process {holder}); "
                "wait for it to end or choose another folder"
            ) from None
        # the holder before us removes the file as it ends: hold the file that is at the path
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if _only_lock(folder):
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def _only_lock(folder: Path) -> bool:
    """Whether the lock file is all ``folder`` holds; else it stays, marking the folder as tlx's."""
    with contextlib.suppress(OSError):
        return {p.name for p in folder.iterdir()} == {LOCK_FILE}
    return False


def lock_holder(folder: Path) -> str | None:
    """The process holding ``folder``'s lock (:func:`run_folder`), as written in it; None when none does."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released with the file below
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None


def _holder(fd: int) -> str:
    """The process id a held lock file records, or ``?``."""
    return os.read(fd, 32).decode(errors="replace").strip() or "?"


def resolved_recipe(recipe: Recipe, dataset_options: BaseModel, head_options: BaseModel) -> dict[str, Any]:
    """The recipe as run: defaults filled in, plugin options validated, relative paths made absolute."""
    data = recipe.model_dump(mode="json", exclude={"finetune"} if recipe.strategy == "features" else None)
    data["dataset"] = {"kind": recipe.dataset.kind, **dataset_options.model_dump(mode="json")}
    data["head"] = {"type": recipe.head.type, **head_options.model_dump(mode="json")}
    for section, key in (("dataset", "root"), ("backbone", "weights")):
        if data[section].get(key) is not None:
            data[section][key] = str(Path(data[section][key]).resolve())
    return data


def provenance(backbone: dict[str, str], recipe: str) -> dict[str, Any]:
    """Versions of everything that shapes the numbers, the identity of the backbone weights, and where
    the run came from: the name of its ``recipe`` file and when it was trained (UTC; not in
    ``metrics.json``, which two runs of one recipe and seed write alike).

    timm's version is read from its metadata: a run whose features are all cached never imports timm.
    """
    from importlib.metadata import version

    import torch

    from tlx import plugins
    from tlx.version import __version__

    return {
        "python": platform.python_version(),
        "tlx": __version__,
        "torch": torch.__version__,
        "timm": version("timm"),
        "plugins": {p.name: p.version for p in plugins.load().plugins if not p.builtin},
        "backbone": backbone,
        "recipe": Path(recipe).name,
        "trained": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_run(
    out: Path,
    *,
    resolved: dict[str, Any],
    provenance: dict[str, Any],
    metrics: dict[str, Any],
    head: nn.Module,
    scores: Scores,
    predictions: Predictions,
    chosen: dict[str, Any],
    painter: Painter,
    tuned_backbone: nn.Module | None = None,
    calibration: Calibration | None = None,
) -> None:
    """Write every file of the run folder; ``metrics.json`` last, so its presence marks a finished run.

    A fine-tuned backbone is saved too (``backbone.safetensors``): its weights are no longer the
    pretrained ones the recipe names. ``provenance.json`` follows the files a run is loaded from, with
    their digests (:func:`load_run` checks them). ``painter`` draws the figures.
    """
    write_recipe(out / RECIPE_FILE, resolved)
    write_head(
        out / HEAD_FILE,
        head,
        classes=scores.classes,
        head_type=metrics["head"],
        feature_dim=metrics["feature_dim"],
    )
    if tuned_backbone is not None:
        write_tensors(out / TUNED_BACKBONE_FILE, tuned_backbone)
    if calibration is not None:
        write_calibration(out / CALIBRATION_FILE, calibration)
    loaded = (
        RECIPE_FILE,
        HEAD_FILE,
        *((TUNED_BACKBONE_FILE,) if tuned_backbone is not None else ()),
        *((CALIBRATION_FILE,) if calibration is not None else ()),
    )
    write_json(out / PROVENANCE_FILE, {**provenance, "files": digests(out, loaded)})
    write_rows(out / "history.csv", metrics["history"])
    write_rows(out / "per_class.csv", scores.per_class())
    write_predictions(out / PREDICTIONS_FILE, predictions, scores.classes)
    mistakes = predictions.mistakes(scores.classes)
    painter.draw(out, metrics["history"], chosen, scores, mistakes, metrics.get("calibration"))
    write_json(out / METRICS_FILE, metrics)


def write_calibration(path: Path, calibration: Calibration) -> None:
    """The calibration as safetensors: the training features and conformal scores, the numbers as
    metadata (exact decimal strings)."""
    from safetensors.numpy import save_file

    tensors = {"train": calibration.train, "scores": calibration.scores.astype("float32")}
    metadata = {k: repr(float(getattr(calibration, k))) for k in ("temperature", "threshold", "accept")}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_calibration(path: Path) -> Calibration:
    """A run's calibration; a damaged file is a TlxError naming it."""
    import math

    from tlx.calibration import Calibration

    tensors, metadata = read_tensors(path)
    try:
        numbers = {k: float(metadata[k]) for k in ("temperature", "threshold", "accept")}
        train, scores = tensors["train"].numpy(), tensors["scores"].numpy()
    except (KeyError, ValueError) as exc:
        raise TlxError(f"{path}: not a calibration tlx wrote ({describe(exc)}); {RESTORE}") from None
    if not all(map(math.isfinite, (numbers["temperature"], numbers["accept"]))) or train.ndim != 2:
        raise TlxError(f"{path}: not a calibration tlx wrote; {RESTORE}")
    return Calibration(scores=scores, train=train, **numbers)


def write_tensors(path: Path, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """A module's state as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def write_head(path: Path, head: nn.Module, *, classes: list[str], head_type: str, feature_dim: int) -> None:
    metadata = {"classes": json.dumps(classes), "head": head_type, "feature_dim": str(feature_dim)}
    write_tensors(path, head, metadata)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """A CSV with one column per key (the union, in first-seen order), atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def write_predictions(path: Path, predictions: Predictions, classes: list[str]) -> None:
    """One row per test image: ``path``, ``true_label``, ``predicted_label``, then ``p_<class>`` per class."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "true_label", "predicted_label", *(f"p_{c}" for c in classes)])
    for image, truth, predicted, row in zip(
        predictions.paths,
        predictions.truth.tolist(),
        predictions.predicted.tolist(),
        predictions.probabilities.numpy(),  # float32: each written in its shortest exact form
    ):
        writer.writerow([image, classes[truth], classes[predicted], *row])
    write_text(path, text.getvalue())


def write_recipe(path: Path, resolved: dict[str, Any]) -> None:
    write_text(path, yaml.safe_dump(resolved, sort_keys=False))


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


@dataclass
class TrainedRun:
    """A run folder read back: the recipe, its components, its frozen backbone, the trained head and
    the classes.

    Features come as in a run, through the backbone's front door (:attr:`frozen`): from the cache, or
    from the runtime the recipe asks for; a fine-tuned backbone's (its weights in the run folder) in
    torch, never cached. The backbone module is built only when something needs it.
    """

    folder: Path
    recipe: Recipe
    parts: Components
    frozen: FrozenBackbone
    head: nn.Module
    classes: list[str]
    #: the temperature, "unknown" threshold and conformal scores (:mod:`tlx.calibration`); None in
    #: runs written before tlx calibrated
    calibration: Calibration | None = None

    @property
    def info(self) -> BackboneInfo:
        return self.frozen.info

    def calibrated(self, key: str) -> Calibration:
        """The run's calibration, for what option ``key`` asks; a run without one is a TlxError."""
        if self.calibration is None:
            raise TlxError(
                f"{key}: {self.folder} has no calibration to make prediction sets from; train it again"
            )
        return self.calibration

    def model(self) -> nn.Module:
        """Backbone and head as one module: normalized images (N, 3, H, W) → logits (N, classes)."""
        from torch import nn

        return nn.Sequential(self.frozen.module, self.head).eval()

    def extract(self, split: Split) -> Features:
        """The features of ``split``'s images (:meth:`FrozenBackbone.features`), on this machine."""
        (features,) = self.frozen.features([split])
        return features


def load_run(folder: Path, overrides: tuple[str, ...] = (), cache_dir: Path | None = None) -> TrainedRun:
    """Read a run's classifier back; the backbone's weights must be those the head was trained on.

    The backbone is recalled from the cache folder (``cache_dir``, as
    :func:`tlx.extraction.store.cache_dir` finds it) as a run recalls it, built only where it is not
    remembered. A run file that is unreadable, truncated, edited (its SHA-256 is not the one in
    ``provenance.json``) or not finite is a :class:`TlxError` naming it.
    """
    from tlx.components import resolve
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.extraction.store import cache_dir as default_cache

    for name in (RECIPE_FILE, PROVENANCE_FILE, HEAD_FILE):
        if not (folder / name).is_file():
            raise TlxError(
                f"{folder}: not a finished tlx run folder ({name} is missing); pass the --out of tlx run"
            )
    provenance = read_provenance(folder / PROVENANCE_FILE)
    tuned, calibrated = folder / TUNED_BACKBONE_FILE, folder / CALIBRATION_FILE
    optional = [p.name for p in (tuned, calibrated) if p.exists()]
    check_digests(folder, provenance, (RECIPE_FILE, HEAD_FILE, *optional))
    recipe = load_recipe(folder / RECIPE_FILE, overrides)
    if (recipe.strategy == "finetune") != tuned.is_file():
        raise TlxError(
            f"{folder / RECIPE_FILE}: strategy is {recipe.strategy}, but {tuned.name} is "
            f"{'missing' if recipe.strategy == 'finetune' else 'in the folder'}; restore the run's files "
            "as the run wrote them"
        )
    recipe = renamed_backbone(recipe, provenance.backbone.plugin, folder)
    expected = provenance.backbone.sha256
    state, classes = read_head(folder / HEAD_FILE, recipe.head.type)
    parts = resolve(recipe, str(folder / RECIPE_FILE))

    def load_tuned(module: nn.Module) -> None:
        weights, _ = read_tensors(tuned)
        load_state(module, weights, tuned, f"backbone {recipe.backbone.name}")

    root = default_cache(cache_dir)
    frozen = FrozenBackbone.of(recipe, parts, root, load_tuned if recipe.strategy == "finetune" else None)
    if frozen.info.sha256 != expected:
        raise TlxError(
            f"{folder / PROVENANCE_FILE}: the weights of backbone {recipe.backbone.name} have changed since "
            f"the run (sha256 {expected[:16]}…, now {frozen.info.sha256[:16]}…); reinstall the weights the "
            "run used or train a new run"
        )
    head = parts.head.factory(frozen.info.feature_dim, len(classes), parts.head_options)
    load_state(head, state, folder / HEAD_FILE, f"{recipe.head.type} head of {folder / RECIPE_FILE}")
    head.eval()
    if calibrated.is_file():
        calibration = read_calibration(calibrated)
    else:
        calibration = None
        notices.warn(
            f"{folder}: no {CALIBRATION_FILE} (a run of an older tlx, or too few images to fit it): "
            "probabilities are not calibrated and no image is called unknown"
        )
    return TrainedRun(folder, recipe, parts, frozen, head, classes, calibration)


def renamed_backbone(recipe: Recipe, plugin: str | None, folder: Path) -> Recipe:
    """``recipe`` of run ``folder`` with its backbone under the name ``plugin`` (the one the run used)
    registers it by now, where the plugin renamed it (``register(..., formerly=...)``), with a note;
    the weights' SHA-256 still has to match."""
    from tlx import plugins

    old = recipe.backbone.name
    entry = plugins.load().backbones.formerly(old)
    if entry is None or entry.plugin != plugin:
        return recipe
    notices.warn(
        f"{folder}: backbone {old} of plugin {plugin} is named {entry.name} now; loaded by that name"
    )
    return recipe.model_copy(update={"backbone": recipe.backbone.model_copy(update={"name": entry.name})})


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; an unreadable or truncated one is a TlxError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a mapping)
    except (OSError, SafetensorError) as exc:
        raise TlxError(f"{path}: cannot read it ({describe(exc)}); {RESTORE}") from None


def read_head(path: Path, head_type: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A run's head state and class names; refused if not finite or of another type than ``head_type``."""
    state, metadata = read_tensors(path)
    read = checked(HeadMetadata, metadata, path)
    saved = read.head or head_type
    if saved != head_type:
        raise TlxError(
            f"{path.with_name(RECIPE_FILE)}: head.type is {head_type}, but {path.name} holds a {saved} head; "
            f"set head.type: {saved} again"
        )
    if not all(v.isfinite().all() for v in state.values() if v.is_floating_point()):
        raise TlxError(f"{path}: the head's weights are not finite (NaN or infinity); train a new run")
    return state, read.classes


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``state`` into ``module``; tensors that do not fit are a TlxError naming both sides."""
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    held = {k: tuple(v.shape) for k, v in state.items()}
    if wanted != held:
        in_file = shorten(", ".join(f"{k} {list(s)}" for k, s in held.items() if wanted.get(k) != s), 80)
        needed = shorten(", ".join(f"{k} {list(s)}" for k, s in wanted.items() if held.get(k) != s), 80)
        raise TlxError(
            f"{path}: does not fit the {what} (the file has {in_file or 'no other tensors'}; it needs "
            f"{needed or 'no other tensors'}); restore the run's files as the run wrote them"
        )
    module.load_state_dict(state)
