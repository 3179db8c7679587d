"""The epoch loop every samunet trainer shares: resume with ``--c``, early stopping, checkpoints, progress log.

A trainer subclasses ``EpochLoop`` and supplies the parts that differ:

    initialize()                 data, model(s), optimiser; sets ``self.params`` (what the optimiser steps)
    train_epoch() -> float       mean training loss; uses ``self.step(loss)`` and ``self.set_poly_lr()``
    validate_epoch() -> (loss, [pseudo Dice per class or prompt type])
    _state() -> dict             what a checkpoint holds (model weights, optimiser, ``self.log``, ...)
    _load_state(state)           the reverse, for ``--c``
    _expected() -> dict          what a checkpoint must match (data set, configuration, encoder, ...)
    _write_run_files()           plans, dataset.json and debug.json beside the fold
    _describe() -> str           the line that opens the training log

The loop itself (``run``): one run per fold at a time (``RunLock``), ``checkpoint_latest.pth`` after every
epoch, ``checkpoint_best.pth`` on a new best moving average of the validation pseudo-Dice, ``checkpoint_final.pth``
at the end, and a stop once that moving average has not improved for ``patience`` epochs (after an optional
cool-down of ``cooldown_epochs`` in which the learning rate falls to 0). Batches depend only on
the seed and the epoch, so a resumed run continues exactly where a killed one stopped.

Under torchrun (``self.dist``, see ``distributed.py``) every process runs the loop; process 0 alone holds the run
lock and writes checkpoints, logs and plots, and the others wait for the final checkpoint before they go on.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from samunet.models.run_checkpoint import check_compatible, load_checkpoint, save_checkpoint
from samunet.training.distributed import Distributed, torch_run_parts
from samunet.training.progress import plot_progress
from samunet.training.run_lock import RunLock
from samunet.utils import SamunetError

EMA_MOMENTUM = 0.9
GRAD_CLIP = 12.0


class EpochLoop:
    score_name = "pseudo Dice"  # the validation score of every epoch, whose moving average decides early stopping
    output: Path
    num_epochs: int
    iterations: int
    patience: int
    initial_lr: float
    cooldown_epochs: int = 0  # after the plateau, epochs over which the learning rate falls to 0 (nnU-Net anneals)
    dist: Distributed = Distributed()  # one process unless a trainer joins torchrun's group

    # ----------------------------------------------------------------- shared steps
    def set_poly_lr(self) -> float:
        """nnU-Net's polynomial decay for this epoch, applied to every parameter group; after the plateau, the same
        decay from that epoch's rate to 0 over the cool-down epochs."""
        cool = self.log.get("cooldown")
        if cool:
            done = (self.epoch - cool["from_epoch"]) / cool["epochs"]
            lr = cool["start_lr"] * max(0.0, 1 - done) ** 0.9
        else:
            lr = self.initial_lr * (1 - self.epoch / self.num_epochs) ** 0.9
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.log["lr"].append(lr)
        return lr

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss`` (gradient scaling on CUDA float16, clipping at ``GRAD_CLIP``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def setup_precision(self) -> None:
        """Mixed precision on CUDA (bfloat16 where supported), full float32 on the CPU."""
        self.amp_dtype = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    # ----------------------------------------------------------------- checkpoints
    def save(self, name: str) -> None:
        if self.dist.is_main:
            save_checkpoint(self._state(), self.output / name)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        check_compatible(state, path, self._expected())
        self._load_state(state)
        self.epoch = int(state["epoch"])
        self.log = state["log"]
        self.best_ema = float(state["best_ema"])

    # ----------------------------------------------------------------- main loop
    def run(self, continue_training: bool = False) -> dict:
        if not self.dist.active:
            if torch_run_parts()[1] > 1:  # started by torchrun, but this trainer does not join the process group
                raise SamunetError(f"{type(self).__name__} trains in one process; start it without torchrun")
            with RunLock(self.output):  # a second run of this fold is refused, naming the running one
                return self._run(continue_training)
        lock, refused = RunLock(self.output), None
        if self.dist.is_main:  # one lock per run, held by process 0; the others learn whether it was granted
            try:
                lock.acquire()
            except SamunetError as e:
                refused = str(e)
        refused = self.dist.broadcast_object(refused)
        if refused:
            raise SamunetError(refused)
        try:
            return self._run(continue_training)
        finally:
            lock.release()

    def _run(self, continue_training: bool) -> dict:
        final = self.output / "checkpoint_final.pth"
        latest = self.output / "checkpoint_latest.pth"
        if not continue_training and (final.is_file() or latest.is_file()):  # before any encoding or labelling
            raise SamunetError(f"{self.output} already holds a training run; pass --c to continue it, or delete "
                               "the folder to start over")
        self.initialize()
        if continue_training:
            if latest.is_file():
                self.load(latest)
                self.text(f"resuming from {latest.name} after epoch {self.epoch}")
            elif final.is_file():
                self.load(final)
                self.text("training had finished; loading checkpoint_final")
            else:
                self.text("no checkpoint to continue from; starting fresh")
        if self.dist.is_main:
            self._write_run_files()
        self.text(self._describe() + f" ({self._stopping_rule()}), device {self.device}")
        while self.epoch < self.num_epochs and not self._stop():
            t0 = time.time()
            train_loss = self.train_epoch()
            val_loss, dice = self.validate_epoch()
            mean_dice = float(np.mean(dice)) if dice else float("nan")
            prev = self.log["ema_dice"][-1] if self.log["ema_dice"] else mean_dice
            ema = EMA_MOMENTUM * prev + (1 - EMA_MOMENTUM) * mean_dice
            for k, v in (("train_loss", train_loss), ("val_loss", val_loss), ("pseudo_dice", mean_dice),
                         ("ema_dice", ema), ("pseudo_dice_per_class", dice), ("epoch_time", time.time() - t0)):
                self.log[k].append(v)
            self.epoch += 1
            improved = ema > self.best_ema
            if improved:
                self.best_ema = ema
            self.save("checkpoint_latest.pth")
            if improved:
                self.save("checkpoint_best.pth")
            if self.dist.is_main:
                plot_progress(self.log, self.output / "progress.png")
            self.text(f"epoch {self.epoch - 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                      f"{self.score_name} {[round(d, 4) for d in dice]}, moving average {ema:.4f}"
                      f"{' (new best)' if improved else ''}, {self.log['epoch_time'][-1]:.1f} s")
        if "cooldown" in self.log or self._plateaued():
            best = int(np.argmax(self.log["ema_dice"]))
            self.log["stopped_early_after_epoch"] = self.epoch
            cool = self.log.get("cooldown")
            self.text(f"early stopping: the moving average of the pseudo-Dice had not improved for {self.patience} "
                      f"epochs (best {self.best_ema:.4f} after epoch {best}); stopped after {self.epoch} of at most "
                      f"{self.num_epochs} epochs ({self.epoch * self.iterations} iterations"
                      + (f", the last {self.epoch - cool['from_epoch']} of them cooling down)" if cool else ")"))
        self.save("checkpoint_final.pth")
        if self.dist.is_main and latest.is_file():
            latest.unlink()
        self.dist.barrier()  # every process may read checkpoint_final from here on
        return self.log

    def _stopping_rule(self) -> str:
        if self.patience <= 0:
            return "no early stopping"
        return f"early stopping after {self.patience} epochs without a new best moving-average pseudo-Dice"

    def _stop(self) -> bool:
        """True when training is over: the cool-down after the plateau has run (or there is none to run)."""
        cool = self.log.get("cooldown")
        if cool:
            return self.epoch >= cool["from_epoch"] + cool["epochs"]
        if not self._plateaued():
            return False
        epochs = min(int(self.cooldown_epochs), self.num_epochs - self.epoch)
        if epochs <= 0:  # (a plateau implies trained epochs, so the log holds their learning rates)
            return True
        self.log["cooldown"] = {"from_epoch": self.epoch, "epochs": epochs, "start_lr": float(self.log["lr"][-1])}
        self.text(f"plateau: the moving average of the pseudo-Dice has not improved for {self.patience} epochs; "
                  f"cooling down: the learning rate falls from {self.log['lr'][-1]:.2e} to 0 over {epochs} epochs")
        return False

    def _plateaued(self) -> bool:
        """True once the moving average of the validation pseudo-Dice has not improved for ``patience`` epochs."""
        ema = self.log["ema_dice"]
        if self.patience <= 0 or not ema:
            return False
        return len(ema) - 1 - int(np.argmax(ema)) >= self.patience
