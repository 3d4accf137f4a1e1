"""``tlx export``: backbone and head as one model file (ONNX or TorchScript), preprocessing beside it.

The model takes a normalized image batch ``image`` (N, 3, H, W), float32, and returns ``logits``
(N, classes); N may vary. The JSON beside it says how to get from an image file to that batch.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from tlx.artifacts import METRICS_FILE, TrainedRun
from tlx.errors import TlxError, describe
from tlx.files import write_atomic, write_json
from tlx.report import describe_preprocessing

Format = Literal["onnx", "torchscript"]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def preprocessing_path(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.preprocessing.json")


def preprocessing(run: TrainedRun) -> dict[str, Any]:
    """The input the exported model expects, as a timm data config plus words, and the class names."""
    config = run.info.data_config
    return {
        "input": "image",
        "output": "logits",
        "layout": "NCHW, float32, RGB",
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "steps": describe_preprocessing(config) + "; values scaled to [0, 1] before the mean and std",
        "classes": run.classes,
        "flip_averaged": run.recipe.extract.flip,
    }


def export(run: TrainedRun, fmt: Format, output: Path, *, force: bool = False) -> Path:
    """Write the model to ``output`` and its preprocessing beside it; returns the preprocessing path.

    Both files are written atomically: a failed export (unwritable folder, full disk) leaves no
    truncated model, and is a :class:`TlxError` naming the file. An existing file is replaced only
    with ``force`` (see :func:`check_output`).
    """
    meta = preprocessing_path(output)
    for path in (output, meta):
        check_output(path, force)
    model = run.model()
    _, height, width = run.info.data_config["input_size"]
    example = torch.zeros(2, 3, height, width)
    make_folder(output.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if fmt == "onnx":
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                dynamo=True,
                verbose=False,
            )
            write: Callable[[Path], None] = lambda tmp: program.save(str(tmp))  # noqa: E731
        else:
            # serialized here, written by Python: torch's own file writer aborts the process on a
            # full disk (an uncaught C++ exception) instead of raising
            buffer = io.BytesIO()
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, example), buffer)
            write = lambda tmp: tmp.write_bytes(buffer.getvalue())  # noqa: E731
    try:
        write_atomic(output, write)
    except OSError as exc:
        raise unwritable(output, exc) from None
    try:
        write_json(meta, preprocessing(run))
    except OSError as exc:
        raise unwritable(meta, exc) from None
    return meta


def check_output(path: Path, force: bool) -> None:
    """Refuse to replace an existing file unless ``force``, and a run folder's own files always.

    In a run folder (one with ``metrics.json``) only an earlier export may be replaced: a model with
    its preprocessing file beside it, or that preprocessing file.
    """
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise TlxError(f"--output: {path} is a folder; name the model file, e.g. {path / 'model.onnx'}")
    if (path.parent / METRICS_FILE).exists() and not _exported(path):
        raise TlxError(
            f"--output: {path} is a file of the run folder {path.parent}; choose another name "
            "(an export is never written over a run's own files)"
        )
    if not force:
        raise TlxError(f"--output: {path} exists; pass --force to replace it, or choose another name")


def _exported(path: Path) -> bool:
    """Whether ``path`` is a model written by an earlier export, or the preprocessing file of one."""
    if preprocessing_path(path).exists():
        return True
    stem = path.name.removesuffix(".preprocessing.json")
    return stem != path.name and any((path.parent / f"{stem}{suffix}").exists() for suffix in SUFFIX.values())


def unwritable(path: Path, exc: OSError) -> TlxError:
    return TlxError(
        f"--output: cannot write {path} ({exc.strerror or describe(exc)}); choose another folder or free "
        "space there"
    )


def make_folder(folder: Path) -> None:
    """Create the folder of ``--output`` before the export's work; a file in the way is a TlxError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise TlxError(
            f"--output: {folder} cannot be a folder, a file of that name or above it is in the way; "
            "choose another path"
        ) from None
    except OSError as exc:
        raise TlxError(
            f"--output: cannot create {folder} ({exc.strerror or exc}); choose another path"
        ) from None
