"""Training samples for the prompted decoder: one object of a cached slice and the prompts a user would give it.

Each sample is a row of the embedding cache (a slice with at least one object) and one object of it (a connected
component of one class, at the encoder's input resolution P x P, coordinates in encoder pixels, x before y). Its
first prompt is drawn from ``KINDS`` with the probabilities there:

- ``box``: the tight box; ``box_jitter``: the box with each edge moved by Gaussian noise (10% of the side) or
  shifted by up to 8 px; ``box_point``: tight box and centre point;
- ``point``: one positive point (the centre, or a random pixel of the object); ``points``: 2-5 positive and
  0-5 negative points (negatives from the box enlarged 2x);
- ``session``: an interactive session as SAM was trained: a first point (centre or random), then 1-4 rounds in which
  a corrective click goes deepest into the largest error region of the previous mask and the previous low-resolution
  logits come back as the mask prompt; only the last round is graded;
- ``refine``: as ``session``, but the session starts from a degraded copy of the object's mask (grown, shrunk,
  shifted, cut, with a stray blob, or empty: what a trained model may predict), given as the mask prompt with its
  box, as ``samunet_zeroshot --refine`` corrects a trained model's prediction;
- ``background``: one point on no object; the target is an empty mask and a predicted IoU of 0, so that the IoU
  head learns to rate such prompts low (what the everything mode filters on).

The rounds of ``session`` and ``refine`` need the model's own predictions, so ``rounds`` is drawn here and played
out by the trainer.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from samunet.preprocessing import prompt_simulation as P

KINDS = {"box": 0.17, "box_jitter": 0.13, "box_point": 0.05, "point": 0.15, "points": 0.1, "session": 0.2,
         "refine": 0.15, "background": 0.05}
MIN_OBJECT_PIXELS = 20     # at the encoder's input resolution
MAX_ROUNDS = 4


class _ForegroundRows:
    """Draws rows that hold at least one object."""

    def __init__(self, presence: np.ndarray):
        self.rows = np.flatnonzero(presence.any(1))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.rows[rng.integers(0, len(self.rows), n)]


class PromptedData:
    """Batches ``{"emb": (B, E, g, g), "target": (B, P, P), "items": [one dict per sample]}`` from a
    ``CachedData`` of the same cases (its embeddings and targets, without augmentation)."""

    def __init__(self, cached, num_classes: int):
        self.cached = cached
        self.classes = list(range(1, num_classes))
        self.sampler = _ForegroundRows(cached.sampler.presence)
        if len(self.sampler.rows) == 0:
            raise ValueError("no cached slice holds an object to prompt")

    def __len__(self):
        return len(self.sampler.rows)

    def batch(self, rows, rng: np.random.Generator, kind: str | None = None) -> dict:
        b = self.cached.batch(rows)
        items = []
        for target in b["target"].numpy():
            valid = target >= 0
            objects = P.find_objects(np.where(valid, target, 0), self.classes, MIN_OBJECT_PIXELS)[0]
            if not objects:   # only slivers: take the largest anyway
                objects = P.find_objects(np.where(valid, target, 0), self.classes, 1)[0]
                objects = [max(objects, key=lambda o: o.area)]
            obj = objects[rng.integers(len(objects))]
            items.append(sample_prompts(obj.mask, valid, target > 0, rng, kind))
        return {**b, "items": items}


def _one_of(weights: dict, rng: np.random.Generator) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys])
    return keys[rng.choice(len(keys), p=p / p.sum())]


def sample_prompts(mask: np.ndarray, valid: np.ndarray, foreground: np.ndarray, rng: np.random.Generator,
                   kind: str | None = None) -> dict:
    """The first prompt of one sample: ``points`` (n, 2) and ``labels`` (n,) or None, ``box`` (4,) or None,
    ``mask_prob`` (P, P) or None (a degraded mask, as probabilities), ``rounds`` of corrective clicks to play,
    ``target`` (P, P) bool, ``valid`` (P, P) bool, and ``iou_target`` (None: the IoU of the predicted mask)."""
    kind = kind or _one_of(KINDS, rng)
    item = {"kind": kind, "points": None, "labels": None, "box": None, "mask_prob": None, "rounds": 0,
            "target": mask, "valid": valid, "iou_target": None}
    box = P.tight_box(mask)
    centre = np.array(P.centre_point(mask), np.float64)
    if kind in ("box", "box_point"):
        item["box"] = box
    if kind == "box_jitter":
        item["box"] = P.noisy_box(box, 0.1, rng) if rng.random() < 0.5 else P.shift_box(box, rng.uniform(1, 8), rng)
    if kind == "box_point":
        item["points"], item["labels"] = centre[None], np.ones(1)
    if kind in ("point", "session"):
        first = centre if rng.random() < 0.6 else P.random_points(mask, 1, rng)[0]
        item["points"], item["labels"] = first[None], np.ones(1)
    if kind == "points":
        n_pos, n_neg = int(rng.integers(2, 6)), int(rng.integers(0, 6))
        pts = [P.random_points(mask, n_pos, rng)] + ([P.negative_points(mask, n_neg, rng)] if n_neg else [])
        item["points"], item["labels"] = np.concatenate(pts), np.r_[np.ones(n_pos), np.zeros(n_neg)]
    if kind == "session":
        item["rounds"] = int(rng.integers(1, MAX_ROUNDS + 1))
    if kind == "refine":
        degraded = degrade_mask(mask, valid, rng)
        item["mask_prob"] = ndimage.gaussian_filter(degraded.astype(np.float32), 1.0)
        item["box"] = P.tight_box(degraded) if degraded.any() else None
        item["rounds"] = int(rng.integers(1, MAX_ROUNDS))
    if kind == "background":
        outside = valid & ~ndimage.binary_dilation(foreground, iterations=3)
        if not outside.any():
            return sample_prompts(mask, valid, foreground, rng, "point")
        item["points"], item["labels"] = P.random_points(outside, 1, rng), np.ones(1)
        item["target"], item["iou_target"] = np.zeros_like(mask), 0.0
    return item


def degrade_mask(mask: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong prediction of ``mask``: grown or shrunk by 1-4 px, shifted by up to 4 px, partly cut away
    (half the time), with a stray blob nearby (a quarter of the time); empty 5% of the time."""
    if rng.random() < 0.05:
        return np.zeros_like(mask)
    out = mask.copy()
    k = int(rng.integers(1, 5))
    morph = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
    out = morph(out, iterations=k)
    if not out.any():
        out = mask.copy()
    dy, dx = rng.integers(-4, 5, 2)
    out = np.roll(out, (int(dy), int(dx)), (0, 1))
    ys, xs = np.nonzero(mask)
    if rng.random() < 0.5:      # cut away what lies beyond a random line through the object
        y0, x0 = ys[rng.integers(len(ys))], xs[rng.integers(len(xs))]
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
        cut = (xx - x0) * np.cos(theta) + (yy - y0) * np.sin(theta) > rng.uniform(0, 0.5) * np.sqrt(len(ys))
        out &= ~cut
    if rng.random() < 0.25:     # a stray blob near the object
        r = rng.uniform(2, 0.6 * np.sqrt(len(ys)) + 2)
        cy = ys.mean() + rng.normal(0, 1) * np.ptp(ys)
        cx = xs.mean() + rng.normal(0, 1) * np.ptp(xs)
        yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out & valid


def pad_points(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Points of several samples as (N, n, 2) coordinates and (N, n) labels, padded with label -1 (SAM's 'no
    point'); None when no sample has points."""
    n = max((0 if it["points"] is None else len(it["points"])) for it in items)
    if n == 0:
        return None, None
    coords = np.zeros((len(items), n, 2), np.float32)
    labels = -np.ones((len(items), n), np.int64)
    for i, it in enumerate(items):
        if it["points"] is not None:
            k = len(it["points"])
            coords[i, :k], labels[i, :k] = it["points"], it["labels"]
    return torch.from_numpy(coords), torch.from_numpy(labels)
