"""The figures of a run (training curves, confusion matrix, the gallery of the test split's
mistakes) and of a sweep (its leaderboard): matplotlib, Agg backend, PNG.

They are drawn by a helper process (:class:`Painter`), started when a command starts: it imports
matplotlib while the command imports torch and trains, so on a machine with a
spare core the figures cost only their drawing. Where matplotlib is already imported
(:func:`preload`, before a sweep forks its processes) they are drawn in-process instead. Figures are
built with matplotlib's object API, never pyplot: drawing leaves the caller's backend alone.
"""

from __future__ import annotations

import io
import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx.files import write_atomic

if TYPE_CHECKING:
    from tlx.scores import Scores


class Painter:
    """A helper process that draws a run's figures on request; a context manager that stops it.

    ``inline``: no helper, the figures are drawn in this process (see :func:`preload`).
    """

    def __init__(self, inline: bool = False) -> None:
        self._proc: subprocess.Popen[str] | None = None
        if inline:
            return
        env = {**os.environ, "MPLBACKEND": "Agg"}
        source = Path(__file__).resolve().parents[1]
        if source not in {Path(folder).resolve() for folder in site.getsitepackages()}:
            # a source tree (installed editable, or not at all): the helper imports this same tlx;
            # a site-packages folder is not put on PYTHONPATH, ahead of the standard library
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tlx.plots"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def draw(
        self,
        out: Path,
        history: list[dict[str, float]],
        chosen: dict,
        scores: Scores,
        mistakes: list[dict[str, Any]],
        calibration: dict[str, Any] | None = None,
    ) -> None:
        """Write ``curves.png``, ``confusion.png`` and ``errors.png`` into ``out``, and with the run's
        ``calibration`` (``metrics.json``'s) ``reliability.png``; an OSError there is raised here.

        ``mistakes``: the misclassified test images to show (``path``, ``true``, ``predicted`` label and
        its ``probability``), in the order shown.
        """
        total = sum(map(sum, scores.confusion))
        wrong = total - sum(scores.confusion[i][i] for i in range(len(scores.classes)))
        job = {
            "out": str(out),
            "history": history,
            "chosen": chosen,
            "classes": scores.classes,
            "confusion": scores.confusion,
            "title": f"test split, accuracy {scores.accuracy:.2%}",
            "mistakes": mistakes,
            "mistakes_title": f"{wrong} of {total} test images misclassified"
            + (f"; the {len(mistakes)} most confident mistakes" if 0 < len(mistakes) < wrong else ""),
            "calibration": calibration,
        }
        self._send(job, out)

    def draw_leaderboard(self, path: Path, labels: list[str], rows: list[dict[str, Any]]) -> None:
        """Write a sweep's ``leaderboard.png`` (:func:`leaderboard`) from its leaderboard rows."""
        keep = ("selection", "selection_std", "test_accuracy", "winner", "selected_by")
        self._send({"kind": "leaderboard", "path": str(path), "labels": labels,
                    "rows": [{k: row[k] for k in keep} for row in rows]}, path)  # fmt: skip

    def _send(self, job: dict[str, Any], out: Path) -> None:
        """Hand the one job to the helper and wait; an OSError there is raised here."""
        if self._proc is None:
            _draw(job)
            return
        stdout, stderr = self._proc.communicate(json.dumps(job))
        if self._proc.returncode == 0:
            return
        if stdout.strip():
            error = json.loads(stdout)
            raise OSError(error["errno"], error["strerror"], error["filename"])
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {self._proc.returncode}"
        raise RuntimeError(f"drawing the figures of {out} failed: {last}")

    def __enter__(self) -> Painter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


def preload() -> None:
    """Import matplotlib and draw a first figure (fonts, the renderer), so that later figures cost only
    their drawing."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    figure.text(0.5, 0.5, "0.5")
    figure.savefig(io.BytesIO(), format="png")


def _serve() -> None:
    """The helper process: import matplotlib, then draw the one job read from stdin."""
    preload()  # before the job arrives
    try:
        text = sys.stdin.read()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the command reports it
        sys.exit(130)
    if not text:  # the command ended without a run to draw
        return
    try:
        _draw(json.loads(text))
    except OSError as exc:
        print(json.dumps({"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}))
        sys.stdout.flush()
        os._exit(1)
    os._exit(0)  # the files are closed: skip the interpreter's teardown


def _draw(job: dict[str, Any]) -> None:
    """Draw one job of :class:`Painter`: a run's three figures, or a sweep's leaderboard."""
    if job.get("kind") == "leaderboard":
        leaderboard(job["labels"], job["rows"], Path(job["path"]))
        return
    out = Path(job["out"])
    training_curves(job["history"], job["chosen"], out / "curves.png")
    confusion_matrix(job["classes"], job["confusion"], out / "confusion.png", job["title"])
    error_gallery(job["mistakes"], out / "errors.png", job["mistakes_title"])
    if job.get("calibration"):
        reliability_diagram(job["calibration"], out / "reliability.png")


def training_curves(history: list[dict[str, float]], chosen: dict, path: Path) -> None:
    """Per epoch: training (and validation) loss, test (and validation) accuracy.

    For a closed-form head the history is its model selection: held-out loss per L2 strength.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if history and "epoch" in history[0]:
        epochs = [h["epoch"] for h in history]
        fig = Figure(figsize=(10, 4))
        loss_ax, acc_ax = fig.subplots(1, 2)
        # fixed margins: the labels are known, and a layout engine doubles the drawing time
        fig.subplots_adjust(left=0.07, right=0.99, bottom=0.12, top=0.92, wspace=0.2)
        loss_ax.plot(epochs, [h["train_loss"] for h in history], marker=".", label="train")
        if "val_loss" in history[0]:
            loss_ax.plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
            acc_ax.plot(epochs, [h["val_accuracy"] for h in history], marker=".", label="validation")
        acc_ax.plot(epochs, [h["test_accuracy"] for h in history], marker=".", label="test")
        if "epochs" in chosen:
            for ax in (loss_ax, acc_ax):
                ax.axvline(chosen["epochs"], color="grey", linestyle="--", label="kept (best validation)")
        loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
        acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        acc_ax.set_ylim(top=1.005)
        for ax in (loss_ax, acc_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
    else:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
        scored = [h for h in history if "val_loss" in h]
        ax.plot([h["l2"] for h in scored], [h["val_loss"] for h in scored], marker="o", label="held-out loss")
        ax.axvline(chosen["l2"], color="grey", linestyle="--", label=f"chosen l2 = {chosen['l2']:g}")
        ax.set(xscale="log", xlabel="L2 strength", ylabel="cross-entropy loss")
        ax.set_title(f"model selection ({chosen.get('selected_by', '')})")
        ax.grid(alpha=0.3)
        ax.legend()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def reliability_diagram(calibration: dict[str, Any], path: Path) -> None:
    """Accuracy against confidence on the test split, per bin, before and after the temperature: a
    calibrated classifier's points lie on the diagonal; the marker's area follows the bin's images."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="calibrated")
    for key, colour, name in (
        ("reliability_uncalibrated", "#d08770", f"softmax, ECE {calibration['ece_uncalibrated']:.3f}"),
        ("reliability", "#2b6cb0", f"T = {calibration['temperature']:.3g}, ECE {calibration['ece']:.3f}"),
    ):
        bins = calibration[key]
        total = max(sum(b["n"] for b in bins), 1)
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=colour, linewidth=1)
        ax.scatter(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            s=[20 + 400 * b["n"] / total for b in bins],
            color=colour,
            alpha=0.8,
            label=name,
        )
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence (largest class probability)")
    ax.set(ylabel="accuracy", title="reliability on the test split")
    ax.legend(loc="upper left")
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def confusion_matrix(classes: list[str], confusion: list[list[int]], path: Path, title: str) -> None:
    """Counts of true (rows) against predicted (columns) classes, row-normalized colours."""
    from matplotlib.figure import Figure

    n = len(classes)
    size = min(3 + 0.5 * n, 14)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    rates = [[c / max(sum(row), 1) for c in row] for row in confusion]
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                colour = "white" if rates[i][j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=colour)
    ax.set_xticks(range(n), classes, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, label="share of the true class")
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


#: the longest side of an image in ``errors.png``, in pixels
THUMBNAIL = 224


def error_gallery(mistakes: list[dict[str, Any]], path: Path, title: str) -> None:
    """The misclassified images as thumbnails, four a row, each captioned with its true label and the
    predicted one with its probability; a figure that says so when there is none.

    The thumbnails are placed pixel for pixel (``figimage``), not resampled into axes. An image that
    cannot be read any more (moved since the run read it) is shown as the reason.
    """
    from matplotlib.figure import Figure

    from tlx.data import load_image
    from tlx.errors import describe

    if not mistakes:
        fig = Figure(figsize=(6, 1.2))
        fig.text(0.5, 0.5, f"{title}: no mistakes to show", ha="center", va="center", fontsize=12)
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        return
    # places in pixels (dpi 100); each cell is a caption over a thumbnail
    gap, caption, heading = 12, 42, 45
    columns = min(len(mistakes), 4)
    rows = -(-len(mistakes) // columns)
    width, height = columns * (THUMBNAIL + gap) + gap, heading + rows * (caption + THUMBNAIL + gap)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    fig.text(0.5, 1 - heading / 2 / height, title, ha="center", va="center", fontsize=11)
    for n, mistake in enumerate(mistakes):
        row, column = divmod(n, columns)
        centre = gap + column * (THUMBNAIL + gap) + THUMBNAIL // 2
        top = height - heading - row * (caption + THUMBNAIL + gap) - caption  # the thumbnail's top edge
        true, predicted = (textwrap.shorten(mistake[k], 30, placeholder="…") for k in ("true", "predicted"))
        label = f"true {true}\npredicted {predicted} ({mistake['probability']:.1%})"
        fig.text(centre / width, (top + 4) / height, label, ha="center", va="bottom", fontsize=9)
        try:
            image = load_image(Path(mistake["path"]))
        except Exception as exc:  # PIL raises many types: the figure still shows the rest
            reason = textwrap.fill(describe(exc), 36)
            middle = (top - THUMBNAIL / 2) / height
            fig.text(centre / width, middle, f"cannot read it:\n{reason}", ha="center", va="center", size=7)
            continue
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        fig.figimage(image, xo=centre - image.width // 2, yo=top - image.height, origin="upper")
    # photos barely compress: the fastest zlib level is a third of the default's time, for a tenth more bytes
    png = {"compress_level": 1}
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", pil_kwargs=png))


def leaderboard(labels: list[str], rows: list[dict[str, Any]], path: Path) -> None:
    """A sweep's combinations, best first: selection score (bar, ± std) beside test accuracy (dot)."""
    from matplotlib.figure import Figure

    n = len(rows)
    width = max(len(label) for label in labels)
    fig = Figure(figsize=(7 + 0.07 * width, 1.2 + 0.38 * n), layout="constrained")
    ax = fig.subplots()
    places = list(range(n))[::-1]  # the winner at the top
    colours = ["tab:orange" if row["winner"] else "tab:blue" for row in rows]
    ax.barh(places, [r["selection"] for r in rows], xerr=[r["selection_std"] for r in rows],
            color=colours, alpha=0.75, capsize=3, label="selection score (training split) ± std")  # fmt: skip
    ax.scatter([r["test_accuracy"] for r in rows], places, color="black", marker="D", s=18, zorder=3,
               label="test accuracy (not used to choose)")  # fmt: skip
    ax.set_yticks(places, [f"★ {label}" if row["winner"] else label for label, row in zip(labels, rows)])
    low = min(min(r["selection"] - r["selection_std"] for r in rows), min(r["test_accuracy"] for r in rows))
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set(xlabel="accuracy", title=f"sweep leaderboard: selected by {rows[0]['selected_by']}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


if __name__ == "__main__":
    _serve()
