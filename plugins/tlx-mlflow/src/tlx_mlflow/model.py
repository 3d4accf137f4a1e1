"""A tlx run folder as an MLflow ``pyfunc`` model: ``mlflow.pyfunc.load_model(uri).predict(frame)`` gives
the class probabilities ``tlx predict`` gives, and ``mlflow models serve`` serves them.

The model holds the run folder (its files, no subfolders or dotfiles) as the artifact ``run``;
:class:`TlxModel` loads it with :func:`tlx.load`, which recalls the backbone's pretrained weights from
the serving machine's cache as ``tlx predict`` does (a fine-tuned backbone travels in the folder).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

import tlx

#: the name of the model in its MLflow run (``runs:/<run_id>/model``)
NAME = "model"
#: the model's artifact holding the run folder
RUN = "run"
#: the input columns: each row names an image file, or holds its encoded bytes (base64 over REST)
INPUTS = ("path", "image")
#: the output columns after one probability column per class
OUTPUTS = ("label", "known", "ood_score")


class TlxModel(PythonModel):
    """A tlx classifier for a DataFrame with a ``path`` column (image files on the serving machine) or an
    ``image`` column (encoded image bytes: JPEG, PNG, ...), one image per row.

    It returns one row per image: the probability of each class (a column per class name, in the run's
    order), the most probable ``label``, and with the run's calibration whether the image looks like
    one of the classes (``known``) and its ``ood_score``, as ``tlx predict --json`` gives them.
    """

    def load_context(self, context: PythonModelContext) -> None:
        self.classifier = tlx.load(context.artifacts[RUN])

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        classes = self.classifier.classes
        images = _images(model_input)
        if not images:
            return pd.DataFrame(columns=[*classes, "label"])
        results, skipped = self.classifier.top_k(images, k=len(classes))
        if skipped:
            name, reason = skipped[0]
            raise tlx.TlxError(f"{name}: cannot decode the image ({reason}); pass only images")
        frame = pd.DataFrame(
            [{t["label"]: t["probability"] for t in r["top_k"]} for r in results], columns=classes
        )
        for column in OUTPUTS:
            if column in results[0]:
                frame[column] = [r[column] for r in results]
        return frame


def _images(frame: pd.DataFrame) -> list[Any]:
    """One image per row: its ``path``, else its ``image`` bytes decoded with Pillow; else a TlxError."""
    from PIL import Image

    if not any(column in frame.columns for column in INPUTS):
        raise tlx.TlxError(
            f"model input: columns {list(frame.columns)} hold no images; pass a column 'path' (image files) "
            "or 'image' (encoded image bytes)"
        )
    images: list[Any] = []
    for i, row in enumerate(frame.itertuples(index=False)):
        given = {c: getattr(row, c) for c in INPUTS if c in frame.columns and not _missing(getattr(row, c))}
        if len(given) != 1:
            raise tlx.TlxError(f"model input row {i}: give one of 'path' and 'image', not {sorted(given)}")
        if "path" in given:
            images.append(Path(given["path"]))
            continue
        try:
            image = Image.open(io.BytesIO(given["image"]))
            image.load()
        except Exception:
            raise tlx.TlxError(
                f"model input row {i}: its 'image' bytes are not an image Pillow can decode; pass a file's "
                "encoded bytes (JPEG, PNG, ...)"
            ) from None
        images.append(image)
    return images


def _missing(value: Any) -> bool:
    """A cell without a value: None or NaN (pandas fills a column's absent cells so)."""
    return value is None or (isinstance(value, float) and value != value)


def signature(classes: list[str]) -> ModelSignature:
    """Input: ``path`` or ``image`` per row; output: a probability per class, ``label``, and ``known``,
    ``ood_score`` for a calibrated run."""
    clash = sorted(set(classes) & set(OUTPUTS))
    if clash:
        raise tlx.TlxError(
            f"class {clash[0]!r} has the name of a column of the model's output ({', '.join(OUTPUTS)}); "
            "rename the class folder to log the model"
        )
    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
    outputs = Schema(
        [
            *(ColSpec("double", name) for name in classes),
            ColSpec("string", "label"),
            ColSpec("boolean", "known", required=False),
            ColSpec("double", "ood_score", required=False),
        ]
    )
    return ModelSignature(inputs, outputs)


def requirements(plugins: list[str]) -> list[str]:
    """tlx, this plugin, MLflow and the run's plugins (those installed as packages), each at the version
    that trained the run: stated, so that logging never asks the network to resolve them."""
    pinned = [f"tlx-vision=={tlx.__version__}", f"tlx-mlflow=={version('tlx-mlflow')}"]
    pinned.append(f"mlflow=={mlflow.__version__}")
    for name in dict.fromkeys(plugins):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # built into tlx (tlx.timm, tlx.heads)
            continue
    return pinned


def log_model(
    client: MlflowClient,
    run_id: str,
    run_dir: Path,
    classes: list[str],
    plugins: list[str],
    registered: str | None,
) -> str:
    """Log the run folder ``run_dir`` as the pyfunc model :data:`NAME` of the MLflow run ``run_id``,
    registered as ``registered`` where given; returns the model's URI. MLflow's tracking URI must be
    ``client``'s (:func:`tlx_mlflow.tracking_to`): MLflow finishes the model through it."""
    schema = signature(classes)  # first: a class named like an output column logs no model
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=NAME, source_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # an example would be an image file of this machine: the signature says what goes in
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        folder = Path(tmp) / RUN
        folder.mkdir()
        for path in run_dir.iterdir():
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, folder / path.name)
        info = Model.log(
            None,  # the deprecated artifact_path: ``name`` replaces it
            name=NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=model.model_id,
            python_model=str(Path(__file__).with_name("serving.py")),
            artifacts={RUN: str(folder)},
            signature=schema,
            pip_requirements=requirements(plugins),
            registered_model_name=registered,
        )
    return info.model_uri
