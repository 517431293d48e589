"""The loss-curve PNG of a training run (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Sequence


def plot_history(history: Sequence[dict[str, float]], path: str) -> None:
    """Loss curves (train and validation, log scale) and the validation errors per epoch, as a
    PNG. Uses matplotlib's Agg canvas directly (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="force-matching loss")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(epochs, [h["val_energy_mae"] for h in history], "o-", color="C2")
    ax.set(xlabel="epoch", ylabel="energy MAE (kJ/mol/atom)", yscale="log",
           title="validation errors")
    twin = ax.twinx()
    twin.plot(epochs, [h["val_force_rmse"] for h in history], "s-", color="C3")
    twin.set(ylabel="force RMSE (kJ/mol/nm)", yscale="log")
    ax.legend(handles=[*ax.get_lines(), *twin.get_lines()],
              labels=["energy MAE", "force RMSE"])
    for axis in fig.axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
