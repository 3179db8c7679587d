"""``samunet_finetune_prompted``: fine-tune the encoder's prompt encoder and mask decoder on one fold."""
from __future__ import annotations

import argparse

from samunet.cli import _entry, _setup_logging
from samunet.utils import SamunetError


@_entry
def finetune_prompted_entry(argv=None):
    from samunet.training.prompted_trainer import DEFAULTS
    p = argparse.ArgumentParser(
        prog="samunet_finetune_prompted",
        description="Fine-tune SAM's prompt encoder and mask decoder (the image encoder stays frozen, its cached "
                    "embeddings are reused) on boxes, points, interactive click sessions and mask corrections "
                    "simulated from the fold's training cases. Evaluate with samunet_zeroshot --decoder MODEL_FOLDER.")
    p.add_argument("dataset", help="data set id or name")
    p.add_argument("configuration", help="configuration (whole slices resized to the encoder input, e.g. 2d)")
    p.add_argument("fold", help="0-4, or 'all' to train on every case")
    p.add_argument("--epochs", type=int, default=None, help=f"number of epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--iterations_per_epoch", type=int, default=None,
                   help=f"default {DEFAULTS['iterations_per_epoch']}")
    p.add_argument("--batch_size", type=int, default=None, help=f"objects per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=None, help=f"initial AdamW learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--num_labeled_cases", type=int, default=None,
                   help="train on a seeded subset of N cases of the fold's training set")
    p.add_argument("--patience", type=int, default=None,
                   help="stop once the moving average of the validation box/point Dice has not improved for this "
                        "many epochs; 0 trains every epoch (default: the plans' early_stopping_patience)")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    _setup_logging()
    for name in ("epochs", "iterations_per_epoch", "batch_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise SamunetError(f"--{name} must be at least 1")
    from samunet.training.prompted_trainer import run_prompted_training
    t = run_prompted_training(a.dataset, a.configuration, a.fold, epochs=a.epochs,
                              iterations_per_epoch=a.iterations_per_epoch, num_labeled_cases=a.num_labeled_cases,
                              continue_training=a.c, device=a.device, batch_size=a.batch_size, patience=a.patience,
                              lr=a.lr)
    dice = t.log["pseudo_dice_per_class"][-1] if t.log["pseudo_dice_per_class"] else []
    print(f"samunet_finetune_prompted: {t.output / 'checkpoint_final.pth'}; validation Dice box / centre point "
          f"{' / '.join(f'{d:.3f}' for d in dice)} after {t.epoch} epochs")
