"""Dice + cross-entropy, as nnU-Net trains, with an ignore value for padding, and its deep supervision."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from samunet.preprocessing.encoder_inputs import IGNORE


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Batch soft Dice over foreground classes (background excluded, as nnU-Net does)."""
    valid = (target != IGNORE).unsqueeze(1).float()
    probs = torch.softmax(logits.float(), 1) * valid
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    return 1 - dice[1:].mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    return ce + soft_dice_loss(logits, target)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for ``n`` outputs, highest resolution first: 1/2^i, the lowest left out, summing to 1."""
    w = [0.5 ** i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    return [x / sum(w) for x in w]


def segmentation_loss(outputs, target: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy of ``logits`` (B, K, Y, X), or of a deep-supervision list of them (highest resolution
    first, each half the size of the one before), against ``target`` (B, Y, X): each output against the target
    downsampled to its size by nearest neighbour (padding stays ``IGNORE``), weighted as nnU-Net weights them."""
    if isinstance(outputs, torch.Tensor):
        return dice_ce_loss(outputs, target)
    total = 0.0
    for w, logits in zip(deep_supervision_weights(len(outputs)), outputs):
        if w == 0:
            continue
        t = target if logits.shape[-2:] == target.shape[-2:] else \
            F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest-exact")[:, 0].long()
        total = total + w * dice_ce_loss(logits, t)
    return total


@torch.no_grad()
def confusion_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-class (TP, FP, FN) of the arg-max prediction, shape (K, 3), padding ignored."""
    k = logits.shape[1]
    pred = logits.argmax(1)
    valid = target != IGNORE
    out = torch.zeros((k, 3), dtype=torch.float64)
    for c in range(k):
        p, t = (pred == c) & valid, (target == c) & valid
        out[c, 0] = (p & t).sum()
        out[c, 1] = (p & ~t).sum()
        out[c, 2] = (~p & t).sum()
    return out
