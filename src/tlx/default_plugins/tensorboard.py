"""The built-in tracker ``tensorboard``: event files in the run folder's ``tb/``, read by ``tensorboard``.

Scalars ``train/loss``, ``test/accuracy`` (and ``val/loss``, ``val/accuracy`` with a validation split)
per epoch, the resolved recipe as hyperparameters with the final metrics, and the run's figures (each
``*.png`` of the run folder) as images ``figures/<name>`` in the Images tab. torch's
``SummaryWriter`` writes them; it is imported when a run starts, so loading plugins stays cheap.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx import TlxError, hookimpl

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

#: the run folder's subfolder holding the event files
FOLDER = "tb"


class TensorBoardTracker:
    """Writes one run's event files into ``run_dir/tb``."""

    def __init__(self, run_dir: Path) -> None:
        self.log_dir = run_dir / FOLDER
        self.writer: SummaryWriter | None = None
        self.params: dict[str, Any] = {}

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.params = {**params, **{f"tag.{k}": v for k, v in tags.items()}}
        # the writer's own thread would fail with a traceback of its own: a file is tried here first
        self.log_dir.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=self.log_dir):
            pass
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        assert self.writer is not None
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, metrics: dict[str, float], run_dir: Path) -> None:
        """The figures and the hyperparameters with the final metrics, in the same folder; the event files
        are in the run folder already."""
        import numpy as np
        from PIL import Image

        assert self.writer is not None
        for figure in sorted(run_dir.glob("*.png")):
            with Image.open(figure) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"figures/{figure.stem}", pixels, 0, dataformats="HWC")
        self.writer.add_hparams(self.params, metrics, run_name=".")
        self.writer.close()

    def fail(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_tracker(options: Any, run_dir: Path) -> TensorBoardTracker:
    """A TensorBoard tracker for ``run_dir``; refused when the tensorboard package is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise TlxError(
            "tracker 'tensorboard' needs the tensorboard package, which is not installed; "
            "install it: pip install 'tlx-vision[tensorboard]' (or pip install tensorboard)"
        )
    return TensorBoardTracker(run_dir)


@hookimpl
def register_trackers(register):
    register(
        "tensorboard",
        tensorboard_tracker,
        description=f"event files in the run folder's {FOLDER}/: per-epoch scalars, hyperparameters, figures",
    )
