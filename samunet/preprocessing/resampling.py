"""In-plane resampling of slice stacks ``(C, S, Y, X)``; the slice axis S is never resampled.

Images use bicubic interpolation; label maps are resampled as one-hot maps with bilinear interpolation followed
by an arg-max, so no label value is invented (nnU-Net resamples segmentations the same way). Work is done in
chunks of slices to bound memory.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK_VOXELS = 32_000_000


def new_inplane_shape(shape_yx, spacing_yx, target_spacing_yx) -> list[int]:
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape_yx, spacing_yx, target_spacing_yx)]


def _chunks(num_slices: int, per_slice: int):
    step = max(1, _CHUNK_VOXELS // max(1, per_slice))
    for s in range(0, num_slices, step):
        yield slice(s, min(num_slices, s + step))


@torch.inference_mode()
def resample_data(data: np.ndarray, new_yx, mode: str = "bicubic") -> np.ndarray:
    """``(C, S, Y, X) -> (C, S, *new_yx)``."""
    c, s, y, x = data.shape
    if [y, x] == list(new_yx):
        return data.astype(np.float32, copy=False)
    out = np.empty((c, s, *new_yx), dtype=np.float32)
    for sl in _chunks(s, c * max(y * x, new_yx[0] * new_yx[1])):
        t = torch.from_numpy(np.ascontiguousarray(data[:, sl].transpose(1, 0, 2, 3))).float()
        r = F.interpolate(t, size=tuple(new_yx), mode=mode, align_corners=False)
        out[:, sl] = r.permute(1, 0, 2, 3).numpy()
    return out


@torch.inference_mode()
def resample_probabilities(probs: np.ndarray, new_yx) -> np.ndarray:
    """Bilinear resampling of per-class maps ``(K, S, Y, X)``."""
    return resample_data(probs, new_yx, mode="bilinear")


@torch.inference_mode()
def resample_seg(seg: np.ndarray, new_yx, label_values) -> np.ndarray:
    """``(S, Y, X)`` label map -> ``(S, *new_yx)`` via one-hot, bilinear, arg-max."""
    s, y, x = seg.shape
    if [y, x] == list(new_yx):
        return seg
    label_values = np.asarray(sorted(label_values))
    out = np.empty((s, *new_yx), dtype=seg.dtype)
    k = len(label_values)
    for sl in _chunks(s, k * max(y * x, new_yx[0] * new_yx[1])):
        t = torch.from_numpy(np.ascontiguousarray(seg[sl]).astype(np.int64))
        idx = torch.from_numpy(np.searchsorted(label_values, t.numpy()))
        onehot = F.one_hot(idx, k).permute(0, 3, 1, 2).float()
        r = F.interpolate(onehot, size=tuple(new_yx), mode="bilinear", align_corners=False)
        out[sl] = label_values[r.argmax(1).numpy()].astype(seg.dtype)
    return out
