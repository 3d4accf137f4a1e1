"""The two figures of a run: training curves and the confusion matrix (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

from tlx.scores import Scores


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: list[dict[str, float]], chosen: dict, path: Path) -> None:
    """Per epoch: training (and validation) loss, test (and validation) accuracy.

    For a closed-form head the history is its model selection: held-out loss per L2 strength.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    if history and "epoch" in history[0]:
        epochs = [h["epoch"] for h in history]
        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
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
        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        scored = [h for h in history if "val_loss" in h]
        ax.plot([h["l2"] for h in scored], [h["val_loss"] for h in scored], marker="o", label="held-out loss")
        ax.axvline(chosen["l2"], color="grey", linestyle="--", label=f"chosen l2 = {chosen['l2']:g}")
        ax.set(xscale="log", xlabel="L2 strength", ylabel="cross-entropy loss")
        ax.set_title(f"model selection ({chosen.get('selected_by', '')})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(scores: Scores, path: Path, title: str) -> None:
    """Counts of true (rows) against predicted (columns) classes, row-normalized colours."""
    plt = _pyplot()
    n = len(scores.classes)
    size = min(3 + 0.5 * n, 14)
    fig, ax = plt.subplots(figsize=(size + 1, size), constrained_layout=True)
    rates = [[c / max(sum(row), 1) for c in row] for row in scores.confusion]
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i, row in enumerate(scores.confusion):
            for j, count in enumerate(row):
                colour = "white" if rates[i][j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=colour)
    ax.set_xticks(range(n), scores.classes, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), scores.classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, label="share of the true class")
    fig.savefig(path, dpi=100)
    plt.close(fig)
