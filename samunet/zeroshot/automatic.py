"""'Everything' mode: automatic masks from a regular grid of point prompts, with no knowledge of the target.

The procedure of segment-anything's ``SamAutomaticMaskGenerator`` (single crop, no post-processing of small
regions), written for any encoder of the registry so it also runs with LiteMedSAM:

1. an n x n grid of points over the image (not the zero padding), offset by half a cell;
2. each point decoded alone with multimask output (three masks per point; one mask for models whose
   multimask outputs were never trained, such as LiteMedSAM, which was distilled with box prompts and a
   single output only);
3. masks kept if their predicted IoU >= ``pred_iou_thresh`` and their stability score (IoU of the mask
   thresholded at +offset and at -offset on the logits) >= ``stability_score_thresh``;
4. duplicates removed by greedy non-maximum suppression on the masks' bounding boxes (box IoU above
   ``box_nms_thresh``), highest predicted IoU first.

Masks are evaluated on the slice grid, as everything else in the zero-shot suite.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AutomaticSettings:
    points_per_side: int = 16
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    chunk_size: int = 16
    multimask: bool = True


def point_grid(n: int, width: float, height: float) -> np.ndarray:
    """(n*n, 2) x, y in encoder pixels: cell centres of an n x n grid over a width x height image."""
    c = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid(c * width, c * height)
    return np.stack([xs.ravel(), ys.ravel()], 1) - 0.5


def stability_score(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """IoU of (logits > offset) and (logits > -offset) per mask; the first lies inside the second."""
    high = (logits > offset).flatten(-2).sum(-1).float()
    low = (logits > -offset).flatten(-2).sum(-1).float()
    return torch.where(low > 0, high / low.clamp_min(1), torch.zeros_like(low))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(M, Y, X) bool -> (M, 4) x0, y0, x1, y1 inclusive (masks must be non-empty)."""
    rows, cols = masks.any(2), masks.any(1)
    y0, y1 = rows.argmax(1), rows.shape[1] - 1 - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), cols.shape[1] - 1 - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], 1).astype(np.float64)


def box_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS; indices kept, best score first (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]) + 1
            ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]) + 1
            if iw > 0 and ih > 0:
                inter = iw * ih
                if inter / (area[i] + area[j] - inter) > thresh:
                    ok = False
                    break
        if ok:
            keep.append(i)
    return keep


def automatic_masks(segmenter, embedding: torch.Tensor, geometry, settings: AutomaticSettings,
                    targets: list[np.ndarray] | None = None) -> dict:
    """Masks of the 'everything' mode on the slice grid: ``masks`` (M, Y, X) bool, ``iou`` (M,) predicted IoU,
    ``stability`` (M,), and how many candidates each filter left (``candidates``, ``after_iou``,
    ``after_stability``, ``after_nms``). With ``targets`` (object masks), ``unfiltered_oracle`` holds each
    object's best Dice over all candidates before any filter: what the grid could give with perfect selection."""
    h, w = geometry.resized
    pts = point_grid(settings.points_per_side, w, h)
    coords = torch.from_numpy(pts[:, None, :]).float()
    labels = torch.ones(len(pts), 1, dtype=torch.int64)
    masks, ious, stab = [], [], []
    best = np.zeros(len(targets or []))
    counts = {"candidates": 0, "after_iou": 0, "after_stability": 0, "max_pred_iou": 0.0}
    for a in range(0, len(pts), settings.chunk_size):
        out = segmenter.predict_prompts(embedding, coords[a:a + settings.chunk_size],
                                        labels[a:a + settings.chunk_size], multimask_output=settings.multimask,
                                        chunk_size=settings.chunk_size)
        logits = geometry.logits_to_slice(out.low_res).flatten(0, 1)        # (n*masks, Y, X)
        binary = logits > 0
        for t, target in enumerate(targets or []):
            inter = (binary & torch.from_numpy(target)).flatten(1).sum(1).float()
            d = 2 * inter / (binary.flatten(1).sum(1) + int(target.sum()))
            best[t] = max(best[t], float(d.max()))
        iou = out.iou.flatten().cpu()
        counts["candidates"] += len(iou)
        counts["max_pred_iou"] = max(counts["max_pred_iou"], float(iou.max()))
        keep = iou >= settings.pred_iou_thresh
        counts["after_iou"] += int(keep.sum())
        s = stability_score(logits, settings.stability_score_offset)
        keep &= s >= settings.stability_score_thresh
        counts["after_stability"] += int(keep.sum())
        keep &= binary.flatten(1).any(1)
        masks.append(binary[keep].numpy())
        ious.append(iou[keep].numpy())
        stab.append(s[keep].numpy())
    masks_np = np.concatenate(masks) if masks else np.zeros((0, *geometry.slice_shape), bool)
    iou_np = np.concatenate(ious) if ious else np.zeros(0)
    stab_np = np.concatenate(stab) if stab else np.zeros(0)
    keep_idx = box_nms(mask_boxes(masks_np), iou_np, settings.box_nms_thresh) if len(masks_np) else []
    counts["after_nms"] = len(keep_idx)
    return {"masks": masks_np[keep_idx], "iou": iou_np[keep_idx], "stability": stab_np[keep_idx],
            "unfiltered_oracle": best, **counts}


def match_object(target: np.ndarray, masks: np.ndarray, iou: np.ndarray) -> dict:
    """Dice of the automatic mask chosen for one object, two ways:

    - ``oracle``: the mask with the best Dice (needs the ground truth: an upper bound);
    - ``pred_iou``: among the masks that overlap the object, the one the model rates best (deployable, given a
      rough location). Dice 0 when no mask overlaps.
    """
    if len(masks) == 0:
        return {"oracle": 0.0, "pred_iou": 0.0, "overlapping": 0}
    inter = (masks & target[None]).reshape(len(masks), -1).sum(1)
    sizes = masks.reshape(len(masks), -1).sum(1)
    dices = 2.0 * inter / (sizes + target.sum())
    overlapping = np.flatnonzero(inter > 0)
    pred = 0.0
    if len(overlapping):
        pred = float(dices[overlapping[np.argmax(iou[overlapping])]])
    return {"oracle": float(dices.max()), "pred_iou": pred, "overlapping": int(len(overlapping)),
            "oracle_index": int(np.argmax(dices)),
            "pred_iou_index": int(overlapping[np.argmax(iou[overlapping])]) if len(overlapping) else -1}
