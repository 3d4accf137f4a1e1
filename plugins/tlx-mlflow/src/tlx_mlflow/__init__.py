"""tlx tracker ``mlflow``: one MLflow run per tlx run, in a real backend store (SQLite by default).

The run gets the resolved recipe as parameters, the metrics per epoch and at the end, the run folder as
artifacts (not tlx's marks: dotfiles such as ``.tlx-run.lock``), its figures as images, and the trained
classifier as the ``pyfunc`` model ``model`` (:mod:`tlx_mlflow.model`).

mlflow is imported when a run starts, so that loading tlx's plugins stays cheap. A store that cannot
be reached or written fails within seconds (:data:`HTTP_BOUNDS`, a SQLite store tried first), not
after MLflow's minutes of retries; tlx then warns and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from tlx import hookimpl

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: the most parameters MLflow takes in one batch
BATCH = 100
#: MLflow's settings while tlx logs, unless set in the environment: a server that does not answer
#: fails in seconds (MLflow's defaults retry for about four minutes); no progress bars in tlx's console
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class MlflowOptions(BaseModel):
    """``track: [{kind: mlflow, tracking_uri: ..., experiment: ...}]``."""

    model_config = ConfigDict(extra="forbid")

    #: the store or server; None: ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` next to the run folder
    tracking_uri: str | None = None
    experiment: str = "tlx"
    #: also register the model in the store's model registry under this name (a new version per run)
    registered_model: str | None = None


def tracking_uri(options: MlflowOptions, run_dir: Path) -> str:
    """The option, else ``$MLFLOW_TRACKING_URI``, else a SQLite database next to the run folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return options.tracking_uri or env or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """:data:`HTTP_BOUNDS` for MLflow's calls inside, where the environment does not set them."""
    missing = {key: value for key, value in HTTP_BOUNDS.items() if key not in os.environ}
    os.environ.update(missing)
    try:
        yield
    finally:
        for key in missing:
            os.environ.pop(key, None)


@contextlib.contextmanager
def tracking_to(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI (which logging a model reads) set to ``uri`` inside; after, the URI
    and the environment variable MLflow mirrors it into resolve as before."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None if previous == env else previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def check_sqlite(uri: str) -> None:
    """Open the SQLite store of ``uri`` for writing, as MLflow would after ten retries (about 100 s)."""
    path = uri.removeprefix("sqlite:///")
    if not uri.startswith("sqlite:///") or not path or path == ":memory:":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")  # a write lock: refused on a read-only file or folder
        db.execute("ROLLBACK")


class MlflowTracker:
    """Logs one tlx run as one MLflow run; each call bounded in time (:func:`bounded`)."""

    def __init__(self, options: MlflowOptions, run_dir: Path) -> None:
        self.options = options
        self.uri = tracking_uri(options, run_dir)
        self.name = run_dir.name
        self.client: MlflowClient | None = None
        self.run_id = ""
        #: the plugins that provide the run's backbone and head: the model's requirements
        self.plugins: list[str] = []

    def _experiment(self, client: MlflowClient) -> str:
        """The experiment's id, created when missing; a SQLite store keeps artifacts next to its file."""
        found = client.get_experiment_by_name(self.options.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return client.create_experiment(self.options.experiment, artifact_location=location)

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        try:
            check_sqlite(self.uri)
            client = MlflowClient(tracking_uri=self.uri)
            with bounded():
                run = client.create_run(self._experiment(client), run_name=self.name, tags=tags)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(
                f"cannot log to the MLflow store {self.uri} ({first}); set the option tracking_uri or "
                "MLFLOW_TRACKING_URI to a store this machine can reach and write"
            ) from exc
        self.client, self.run_id = client, run.info.run_id
        self.plugins = [tags[key] for key in ("backbone_plugin", "head_plugin") if key in tags]
        items = [Param(k, str(v)) for k, v in params.items()]
        with bounded():
            for i in range(0, len(items), BATCH):
                client.log_batch(self.run_id, params=items[i : i + BATCH])

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        assert self.client is not None
        now = int(time.time() * 1000)
        with bounded():
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics(metrics, step)

    def finish(self, metrics: dict[str, float], run_dir: Path) -> None:
        """The final metrics; the run folder's files and subfolders as artifacts, except dotfiles (tlx's
        marks); each figure (``*.png``) as an image; the classifier as the pyfunc model."""
        from PIL import Image

        from tlx_mlflow.model import log_model

        assert self.client is not None
        self._metrics(metrics, 0)
        classes = json.loads((run_dir / "metrics.json").read_text())["classes"]
        with bounded():
            for path in sorted(run_dir.iterdir()):
                if path.name.startswith("."):
                    continue
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), path.name)
                else:
                    self.client.log_artifact(self.run_id, str(path))
            for figure in sorted(run_dir.glob("*.png")):
                with Image.open(figure) as image:
                    self.client.log_image(self.run_id, image.convert("RGB"), key=figure.stem, step=0)
            with tracking_to(self.uri):
                uri = log_model(
                    self.client, self.run_id, run_dir, classes, self.plugins, self.options.registered_model
                )
            self.client.set_tag(self.run_id, "model_uri", uri)
            self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        if self.client is not None:
            with bounded():
                self.client.set_terminated(self.run_id, "FAILED")


@hookimpl
def register_trackers(register):
    register(
        "mlflow",
        MlflowTracker,
        description="an MLflow store (default: mlflow.db next to the runs): params, metrics, artifacts, "
        "figures, the model",
        options=MlflowOptions,
    )
