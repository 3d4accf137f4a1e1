"""tlx tracker ``mlflow``: one MLflow run per tlx run, in a real backend store (SQLite by default).

mlflow is imported when a run starts, so that loading tlx's plugins stays cheap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from tlx import hookimpl

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: the most parameters MLflow takes in one batch
BATCH = 100


class MlflowOptions(BaseModel):
    """``track: [{kind: mlflow, tracking_uri: ..., experiment: ...}]``."""

    model_config = ConfigDict(extra="forbid")

    #: the store or server; None: ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` next to the run folder
    tracking_uri: str | None = None
    experiment: str = "tlx"


def tracking_uri(options: MlflowOptions, run_dir: Path) -> str:
    """The option, else ``$MLFLOW_TRACKING_URI``, else a SQLite database next to the run folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return options.tracking_uri or env or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


class MlflowTracker:
    """Logs one tlx run as one MLflow run."""

    def __init__(self, options: MlflowOptions, run_dir: Path) -> None:
        self.options = options
        self.uri = tracking_uri(options, run_dir)
        self.name = run_dir.name
        self.client: MlflowClient | None = None
        self.run_id = ""

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
            client = MlflowClient(tracking_uri=self.uri)
            run = client.create_run(self._experiment(client), run_name=self.name, tags=tags)
        except Exception as exc:
            raise RuntimeError(
                f"cannot log to the MLflow store {self.uri} ({exc}); set the option tracking_uri or "
                "MLFLOW_TRACKING_URI to a store this machine can reach and write"
            ) from exc
        self.client, self.run_id = client, run.info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            client.log_batch(self.run_id, params=items[i : i + BATCH])

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        assert self.client is not None
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics(metrics, step)

    def finish(self, metrics: dict[str, float], run_dir: Path) -> None:
        assert self.client is not None
        self._metrics(metrics, 0)
        self.client.log_artifacts(self.run_id, str(run_dir))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, "FAILED")


@hookimpl
def register_trackers(register):
    register(
        "mlflow",
        MlflowTracker,
        description="an MLflow store (default: mlflow.db next to the runs): params, metrics, artifacts",
        options=MlflowOptions,
    )
