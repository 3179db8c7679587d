"""Training log and ``progress.png`` (losses, pseudo Dice and its moving average, learning rate, epoch time)."""
from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOG_KEYS = ("train_loss", "val_loss", "pseudo_dice", "ema_dice", "lr", "epoch_time")


def new_log() -> dict:
    return {k: [] for k in LOG_KEYS} | {"pseudo_dice_per_class": []}


class TextLog:
    """Appends timestamped lines to the fold's training log and mirrors them to the samunet logger."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(folder.glob("training_log_*.txt"))
        self.path = existing[-1] if existing else folder / f"training_log_{datetime.now():%Y_%m_%d_%H_%M_%S}.txt"
        self.logger = logging.getLogger("samunet")

    def __call__(self, message: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S}: {message}\n")
        self.logger.info(message)


def plot_progress(log: dict, path: Path) -> None:
    epochs = range(len(log["train_loss"]))
    if not len(epochs):
        return
    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
    ax = axes[0]
    ax.plot(epochs, log["train_loss"], color="b", label="train loss")
    ax.plot(epochs, log["val_loss"], color="r", label="val loss")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, log["pseudo_dice"], color="g", ls="dotted", label="pseudo Dice")
    ax2.plot(epochs, log["ema_dice"], color="g", label="pseudo Dice (moving average)")
    ax2.set_ylabel("Dice")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    axes[1].plot(epochs, log["epoch_time"], color="b")
    axes[1].set_ylabel("epoch time (s)")
    axes[2].plot(epochs, log["lr"], color="b")
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
