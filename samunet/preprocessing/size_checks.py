"""Refuse a case whose in-plane resampling would explode, before any work is done on it.

A wrong header (say 1000 mm instead of 1 mm on one axis) turns a 35-voxel axis into 35000 voxels at the data set's
target spacing, and a larger image would exhaust memory. Two rules, both checked from the header alone:

- the in-plane resampling factor must lie within ``MAX_ZOOM`` (either way);
- the resampled case must fit the plans' memory budget (``budgets.memory_gb``), counting the float32 image three
  times (the input, the resampled copy and the clipped result).
"""
from __future__ import annotations

import numpy as np

from samunet.preprocessing.resampling import new_inplane_shape

MAX_ZOOM = 20.0
COPIES = 3


def resampled_gb(shape_t, spacing_t, target_inplane, channels: int) -> tuple[list[int], float]:
    """``(S, Y', X')`` after in-plane resampling, and the GB preprocessing needs for it."""
    new_yx = new_inplane_shape(shape_t[1:], spacing_t[1:], target_inplane)
    shape = [int(shape_t[0])] + new_yx
    return shape, COPIES * 4 * channels * float(np.prod(shape, dtype=np.float64)) / 1e9


def resampling_problem(file, shape_t, spacing_t, target_inplane, channels: int,
                       memory_gb: float | None) -> str | None:
    """A message naming ``file`` when its resampling is implausible or too large, else None."""
    for s, t in zip(spacing_t[1:], target_inplane):
        zoom = float(s) / float(t)
        if not (1 / MAX_ZOOM <= zoom <= MAX_ZOOM):
            shape, _ = resampled_gb(shape_t, spacing_t, target_inplane, channels)
            target = tuple(float(x) for x in target_inplane)
            return (f"{file}: in-plane spacing {tuple(float(x) for x in spacing_t[1:])} mm is "
                    f"{round(zoom, 3):g} times the plans' target spacing {target} mm (allowed: within a factor "
                    f"{MAX_ZOOM:g}); resampled, the case would be {' x '.join(map(str, shape))} voxels. Check the "
                    "file's header")
    shape, gb = resampled_gb(shape_t, spacing_t, target_inplane, channels)
    if memory_gb is not None and gb > memory_gb:
        return (f"{file}: resampled to {' x '.join(map(str, shape))} voxels, preprocessing would need about "
                f"{gb:.2g} GB, more than the memory budget of {memory_gb:g} GB (samunet_plan_experiment --memory_gb)")
    return None
