"""Segmentation metrics per case and per class, in physical units.

For every evaluated label the binary masks ``reference == label`` and ``prediction == label`` are compared:

- ``TP``, ``FP``, ``FN``, ``TN``: voxel counts; ``n_ref = TP + FN`` and ``n_pred = TP + FP``.
- ``Dice = 2 TP / (2 TP + FP + FN)`` and ``IoU = TP / (TP + FP + FN)``.
- ``HD95``: the 95th percentile Hausdorff distance in mm. Surface voxels are the voxels of a mask with at least one
  face neighbour outside it (voxels on the image border count as surface). For every surface voxel of one mask the
  distance to the nearest surface voxel of the other is computed with an exact Euclidean distance transform that
  uses the voxel spacing (so anisotropic spacing is handled). HD95 is the larger of the two directed 95th
  percentiles (numpy's linear interpolation), as in MONAI.
- ``NSD``: normalised surface distance (surface Dice, Nikolov et al. 2021) at a tolerance in mm: the fraction of
  surface voxels of both masks that lie within the tolerance of the other mask's surface,
  ``(|{a: d(a, S_pred) <= tol}| + |{b: d(b, S_ref) <= tol}|) / (|S_ref| + |S_pred|)``, counting voxels.

Axes of length 1 are left out of the surface computation: a 2D image stored as ``(1, Y, X)`` (natural images carry
a dummy spacing of 999 on that axis) is evaluated as a 2D image. For natural images the spacing is 1 per pixel, so
"mm" means pixels there.

Empty masks (conventions):

=====================  ===========  ===========  ============================  ======
reference / prediction  Dice        IoU          HD95                          NSD
=====================  ===========  ===========  ============================  ======
both empty             NaN          NaN          NaN                           NaN
exactly one empty      0            0            diagonal of the image (mm)    0
=====================  ===========  ===========  ============================  ======

Dice and IoU follow nnU-Net (NaN when ``TP + FP + FN == 0``). A case with both masks empty says nothing about the
quality of a segmentation, so every metric is NaN and means leave it out. When exactly one mask is empty there is no
surface to measure a distance to; HD95 then takes the diagonal of the image's field of view
(``sqrt(sum((shape_i * spacing_i)^2))`` over the axes longer than 1), a finite value larger than any distance two
non-empty masks in that image can have. An infinite value would turn every mean into ``inf``; the diagonal keeps
means finite while ranking a missed or hallucinated structure below any prediction that finds it.

Means over cases (:func:`mean_metrics`) ignore NaN; a mean over nothing but NaN is NaN.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from samunet.utils import SamunetError

METRIC_NAMES = ("Dice", "IoU", "HD95", "NSD", "TP", "FP", "FN", "TN", "n_ref", "n_pred")
DEFAULT_NSD_TOLERANCE_MM = 1.0


def _spacing_for(shape: tuple[int, ...], spacing: Sequence[float] | None) -> np.ndarray:
    if spacing is None:
        return np.ones(len(shape), float)
    sp = np.asarray(spacing, float)
    if sp.shape != (len(shape),):
        raise SamunetError(f"spacing {tuple(sp.tolist())} does not match an array with {len(shape)} axes")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise SamunetError(f"spacing must be positive and finite, got {tuple(sp.tolist())}")
    return sp


def _squeeze(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave out axes of length 1 (the dummy axis of 2D images)."""
    keep = [i for i, n in enumerate(mask.shape) if n > 1]
    if len(keep) == mask.ndim:
        return mask, spacing
    if not keep:  # a single voxel
        return mask.reshape(1), spacing[:1]
    return mask.reshape([mask.shape[i] for i in keep]), spacing[keep]


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Diagonal of the field of view in mm, over the axes longer than 1 (the HD95 of a one-sided empty case)."""
    shape = tuple(int(n) for n in shape)
    sp = _spacing_for(shape, spacing)
    extent = [n * s for n, s in zip(shape, sp) if n > 1]
    if not extent:
        extent = [float(sp[0])]
    return float(np.sqrt(np.sum(np.square(extent))))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both masks grown by one voxel, so that cropping does not invent or hide surface voxels."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    return tuple(box)


def surface_distances(reference: np.ndarray, prediction: np.ndarray,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``reference`` to the surface of ``prediction``, and back.

    Both masks must be non-empty and of the same shape.
    """
    ref, pred = np.asarray(reference, bool), np.asarray(prediction, bool)
    if ref.shape != pred.shape:
        raise SamunetError(f"shapes differ: reference {ref.shape} vs prediction {pred.shape}")
    if not ref.any() or not pred.any():
        raise ValueError("surface distances need two non-empty masks")
    sp = _spacing_for(ref.shape, spacing)
    ref, sp_sq = _squeeze(ref, sp)
    pred, _ = _squeeze(pred, sp)
    box = _crop_box(ref, pred)  # the distance transform only needs the region holding both surfaces
    ref, pred = ref[box], pred[box]
    s_ref, s_pred = _surface(ref), _surface(pred)
    # distance_transform_edt gives, for every non-zero voxel, the distance to the nearest zero voxel
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=sp_sq)
    to_ref = ndimage.distance_transform_edt(~s_ref, sampling=sp_sq)
    return to_pred[s_ref], to_ref[s_pred]


def _hd95_nsd(ref: np.ndarray, pred: np.ndarray, spacing: np.ndarray, tol: float) -> tuple[float, float]:
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not has_ref and not has_pred:
        return float("nan"), float("nan")
    if has_ref != has_pred:
        return image_diagonal(ref.shape, spacing), 0.0
    d_ref, d_pred = surface_distances(ref, pred, spacing)
    hd95 = max(float(np.percentile(d_ref, 95)), float(np.percentile(d_pred, 95)))
    nsd = (np.count_nonzero(d_ref <= tol) + np.count_nonzero(d_pred <= tol)) / (d_ref.size + d_pred.size)
    return hd95, float(nsd)


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance in mm, with the empty-mask conventions of this module."""
    ref, pred = np.asarray(reference, bool), np.asarray(prediction, bool)
    return _hd95_nsd(ref, pred, _spacing_for(ref.shape, spacing), DEFAULT_NSD_TOLERANCE_MM)[0]


def normalized_surface_distance(reference: np.ndarray, prediction: np.ndarray,
                                spacing: Sequence[float] | None = None,
                                tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> float:
    """Normalised surface distance (surface Dice) at ``tolerance_mm``, with the empty-mask conventions."""
    ref, pred = np.asarray(reference, bool), np.asarray(prediction, bool)
    return _hd95_nsd(ref, pred, _spacing_for(ref.shape, spacing), float(tolerance_mm))[1]


def compute_binary_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] | None = None,
                           nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                           ignore_mask: np.ndarray | None = None) -> dict[str, float | int]:
    """All metrics for one pair of binary masks of the same shape.

    ``ignore_mask`` marks voxels to leave out: they count in no voxel total, and for the surface metrics they are
    background in both masks.
    """
    ref, pred = np.asarray(reference, bool), np.asarray(prediction, bool)
    if ref.shape != pred.shape:
        raise SamunetError(f"shapes differ: reference {ref.shape} vs prediction {pred.shape}")
    if nsd_tolerance_mm < 0:
        raise SamunetError(f"the NSD tolerance must be >= 0 mm, got {nsd_tolerance_mm}")
    sp = _spacing_for(ref.shape, spacing)
    if ignore_mask is not None:
        keep = ~np.asarray(ignore_mask, bool)
        ref, pred = ref & keep, pred & keep
        n_total = int(np.count_nonzero(keep))
    else:
        n_total = ref.size
    tp = int(np.count_nonzero(ref & pred))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    tn = n_total - tp - fp - fn
    if tp + fp + fn == 0:
        dice = iou = float("nan")
    else:
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
    hd, nsd = _hd95_nsd(ref, pred, sp, float(nsd_tolerance_mm))
    return {"Dice": dice, "IoU": iou, "HD95": hd, "NSD": nsd, "TP": tp, "FP": fp, "FN": fn, "TN": tn,
            "n_ref": tp + fn, "n_pred": tp + fp}


def compute_metrics(reference: np.ndarray, prediction: np.ndarray, labels: Iterable[int],
                    spacing: Sequence[float] | None = None, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    ignore_label: int | None = None) -> dict[str, dict[str, float | int]]:
    """Metrics per label for two label maps of the same shape; keys are the labels as strings (as in nnU-Net).

    Voxels where the reference holds ``ignore_label`` are left out of every metric.
    """
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise SamunetError(f"shapes differ: reference {reference.shape} vs prediction {prediction.shape}")
    ignore = (reference == ignore_label) if ignore_label is not None else None
    out = {}
    for label in labels:
        label = int(label)
        if ignore_label is not None and label == ignore_label:
            raise SamunetError(f"label {label} is the ignore label and cannot be evaluated")
        out[str(label)] = compute_binary_metrics(reference == label, prediction == label, spacing,
                                                 nsd_tolerance_mm, ignore)
    return out


def _nanmean(values: list[float]) -> float:
    finite = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_metrics(per_case: list[dict[str, dict[str, float]]],
                 labels: Iterable[int] | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-class means over cases and the mean of those over classes, both ignoring NaN.

    ``per_case`` is a list of :func:`compute_metrics` results. Returns ``(mean, foreground_mean)`` where ``mean``
    maps each label (string) to its metric means and ``foreground_mean`` maps each metric to the mean over classes.
    """
    keys = [str(int(k)) for k in labels] if labels is not None else (list(per_case[0]) if per_case else [])
    mean: dict[str, dict[str, float]] = {}
    for k in keys:
        names = [m for m in METRIC_NAMES if any(m in case.get(k, {}) for case in per_case)]
        mean[k] = {m: _nanmean([case[k][m] for case in per_case if k in case and m in case[k]]) for m in names}
    names = [m for m in METRIC_NAMES if any(m in mean[k] for k in keys)]
    foreground_mean = {m: _nanmean([mean[k][m] for k in keys if m in mean[k]]) for m in names}
    return mean, foreground_mean
