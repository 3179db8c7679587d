"""The cheap per-case invariants every later step depends on, checked wherever a case is read.

The integrity check lists them for every case; fingerprinting and preprocessing refuse a case that breaks one,
with or without ``--verify_dataset_integrity``, so a bad case never reaches training as a bare ``IndexError``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from samunet.dataset.io import geometry_mismatch


def image_problems(data: np.ndarray, props: dict, dims: int | None = None) -> list[str]:
    """NaN/Inf voxels per channel; a 2D file where the data set is 3D (or the reverse)."""
    problems = []
    files = props["files"]
    bad = ~np.isfinite(data)
    if bad.any():
        for c, n in enumerate(bad.reshape(data.shape[0], -1).sum(1)):
            if n:
                problems.append(f"{files[min(c, len(files) - 1)]}: {int(n)} NaN/Inf voxel(s) in channel {c}")
    if dims is not None and props["dims"] != dims:
        problems.append(f"{files[0]}: {props['dims']}D image, but the data set is {dims}D (all its cases must have "
                        f"the same dimensionality)")
    return problems


def label_problems(data: np.ndarray, props: dict, seg: np.ndarray, seg_props: dict, label_file,
                   label_values) -> list[str]:
    """Label geometry against the image, undeclared label values, foreground on an image without contrast."""
    label_file = Path(label_file)
    problems = []
    mismatch = geometry_mismatch(props, seg_props)
    if mismatch:
        problems.append(f"{label_file}: geometry differs from image {Path(props['files'][0]).name} ({mismatch})")
    found = np.unique(seg).tolist()
    undeclared = sorted(set(found) - set(label_values))
    if undeclared:
        problems.append(f"{label_file}: label value(s) {undeclared} not declared in dataset.json "
                        f"(declared: {sorted(label_values)})")
    if any(v != 0 for v in found) and data.size and np.isfinite(data).all():
        flat = data.reshape(data.shape[0], -1)
        if np.all(flat.min(1) == flat.max(1)):
            value = float(flat[0, 0])
            problems.append(f"{props['files'][0]}: image is constant (every voxel {value:g}) but its label "
                            f"{label_file.name} has {int(np.count_nonzero(seg))} foreground voxel(s); an image "
                            f"without contrast cannot be normalised or learned from (wrong or empty file?)")
    return problems


# a case whose spacing differs from the data set's median by more than this factor on any axis is refused: its
# header is almost certainly wrong, and resampling it to the data set's spacing could need unbounded memory
MAX_SPACING_RATIO = 20.0


def dataset_geometry_problems(cases: list[dict]) -> list[str]:
    """Across cases (``{"file", "dims", "spacing"}`` each): one dimensionality, no spacing far off the median."""
    if not cases:
        return []
    problems = []
    dims = [c["dims"] for c in cases]
    majority = max(sorted(set(dims)), key=dims.count)
    for c in cases:
        if c["dims"] != majority:
            problems.append(f"{c['file']}: {c['dims']}D image, but {dims.count(majority)} of the data set's "
                            f"{len(cases)} cases are {majority}D (all cases must have the same dimensionality)")
    same = [c for c in cases if c["dims"] == majority]
    spacings = np.array([c["spacing"] for c in same], float)
    median = np.median(spacings, 0)
    axes = range(1, 3) if majority == 2 else range(3)  # 2D files: the dummy axis (spacing 999) is not compared
    for c, sp in zip(same, spacings):
        for a in axes:
            ratio = sp[a] / median[a] if median[a] > 0 else np.inf
            if not (1 / MAX_SPACING_RATIO <= ratio <= MAX_SPACING_RATIO):
                problems.append(f"{c['file']}: spacing {tuple(float(x) for x in sp)} mm is "
                                f"{round(float(ratio), 3):g} times the data set's median {float(median[a]):g} mm "
                                f"on axis {a} (allowed: within a factor {MAX_SPACING_RATIO:g}); check the file's "
                                "header")
                break
    return problems
