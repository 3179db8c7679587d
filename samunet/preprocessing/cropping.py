"""Cropping to the non-zero region (as nnU-Net does) and pasting back."""
from __future__ import annotations

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask


def nonzero_bbox(data: np.ndarray) -> list[list[int]]:
    """Half-open bounding box ``[[z0, z1], [y0, y1], [x0, x1]]`` of voxels non-zero in any channel.

    An all-zero image keeps its full extent.
    """
    mask = np.any(data != 0, axis=0)
    return [[int(a), int(b)] for a, b in get_bbox_from_mask(mask)]


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None):
    """Crop ``(C, Z, Y, X)`` data (and an optional ``(Z, Y, X)`` label map) to the non-zero bounding box."""
    bbox = nonzero_bbox(data)
    sl = bounding_box_to_slice(bbox)
    data = data[(slice(None),) + sl]
    if seg is not None:
        seg = seg[sl]
    return data, seg, bbox


def paste_into(full_shape, cropped: np.ndarray, bbox, fill) -> np.ndarray:
    """Inverse of cropping for an array with leading channel axis: ``(K, *cropped) -> (K, *full_shape)``."""
    out = np.empty((cropped.shape[0], *full_shape), dtype=cropped.dtype)
    out[...] = np.asarray(fill, dtype=cropped.dtype).reshape(-1, *([1] * len(full_shape)))
    out[(slice(None),) + bounding_box_to_slice(bbox)] = cropped
    return out
