"""Objects of a label slice and prompts simulated from them, as a user would give them (used by the prompted-
decoder trainer and the zero-shot suite alike).

An object is one connected component (4-connectivity) of one class in one slice. All coordinates here are in the
pixel grid of the slice, x before y (SAM's convention): a point is ``(x, y)`` at a pixel centre, a box is
``(x0, y0, x1, y1)`` with the first and last pixel the object covers (inclusive). Mapping to the encoder input is
done elsewhere (`samunet.preprocessing.prompt_geometry.SliceGeometry`). Every random draw takes a
``numpy.random.Generator``, so a seed fixes all prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


@dataclass
class SliceObject:
    label: int                    # label value of the class
    component: int                # 1-based index of the connected component within its class and slice
    mask: np.ndarray              # (Y, X) bool
    area: int = field(init=False)

    def __post_init__(self):
        self.area = int(self.mask.sum())


def find_objects(seg: np.ndarray, label_values, min_size: int) -> tuple[list[SliceObject], list[dict]]:
    """Connected components of every foreground class. Components smaller than ``min_size`` pixels are
    returned separately (label, component, area) so they can be counted, not silently dropped."""
    kept, skipped = [], []
    for value in sorted(v for v in label_values if v != 0):
        comps, n = ndimage.label(seg == value)
        if n == 0:
            continue
        areas = np.bincount(comps.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            if areas[k] < min_size:
                skipped.append({"label": int(value), "component": k, "area": int(areas[k])})
            else:
                kept.append(SliceObject(int(value), k, comps == k))
    return kept, skipped


def deepest_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel farthest from the region's boundary (the image border counts as boundary); ties go to the
    first in raster order. Returns (x, y)."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def centre_point(mask: np.ndarray) -> tuple[int, int]:
    """The centroid's pixel if it lies inside the object, else the point deepest inside it. (x, y)."""
    ys, xs = np.nonzero(mask)
    cy, cx = int(round(float(ys.mean()))), int(round(float(xs.mean())))
    if mask[cy, cx]:
        return cx, cy
    return deepest_point(mask)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1): first and last column and row of the object, inclusive."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def random_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct random pixels of the region (with repetition only if it has fewer than ``n``). (n, 2) x, y."""
    ys, xs = np.nonzero(mask)
    idx = rng.choice(len(xs), size=n, replace=len(xs) < n)
    return np.stack([xs[idx], ys[idx]], 1).astype(np.float64)


def negative_points(mask: np.ndarray, n: int, rng: np.random.Generator, enlarge: float = 2.0) -> np.ndarray:
    """``n`` random pixels outside the object inside its tight box enlarged ``enlarge`` times about the box
    centre (clipped to the slice). Falls back to the whole slice outside the object if that ring is empty."""
    x0, y0, x1, y1 = tight_box(mask)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0 + 1) * enlarge / 2, (y1 - y0 + 1) * enlarge / 2
    h, w = mask.shape
    region = np.zeros_like(mask)
    region[max(0, int(np.floor(cy - hh + 0.5))):min(h, int(np.ceil(cy + hh + 0.5))),
           max(0, int(np.floor(cx - hw + 0.5))):min(w, int(np.ceil(cx + hw + 0.5)))] = True
    candidates = region & ~mask
    if not candidates.any():
        candidates = ~mask
    return random_points(candidates, n, rng)


def random_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors with uniformly distributed angle. (n, 2) x, y."""
    theta = rng.uniform(0.0, 2 * np.pi, n)
    return np.stack([np.cos(theta), np.sin(theta)], 1)


def shift_box(box: np.ndarray, distance: float, rng: np.random.Generator) -> np.ndarray:
    """The box translated by exactly ``distance`` pixels in a uniformly random direction (size unchanged)."""
    d = random_directions(1, rng)[0] * distance
    return box + np.array([d[0], d[1], d[0], d[1]])


def noisy_box(box: np.ndarray, relative: float, rng: np.random.Generator) -> np.ndarray:
    """Each edge moved independently by Gaussian noise with standard deviation ``relative`` times the box's
    width (x0, x1) or height (y0, y1). The edges are then ordered so that x0 <= x1 and y0 <= y1."""
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    out = box + rng.normal(0.0, 1.0, 4) * relative * np.array([w, h, w, h])
    return np.array([min(out[0], out[2]), min(out[1], out[3]), max(out[0], out[2]), max(out[1], out[3])])


def shift_point(point, distance: float, rng: np.random.Generator) -> np.ndarray:
    """The point moved by exactly ``distance`` pixels in a uniformly random direction."""
    return np.asarray(point, dtype=np.float64) + random_directions(1, rng)[0] * distance


def correction_click(prediction: np.ndarray, target: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """The next corrective click: in the largest connected error region (missed foreground or false
    foreground), the point deepest inside it; label 1 for missed foreground, 0 for false foreground.
    None when there is no error."""
    best = None
    for region, label in ((target & ~prediction, 1), (prediction & ~target, 0)):
        comps, n = ndimage.label(region)
        if n == 0:
            continue
        areas = np.bincount(comps.ravel(), minlength=n + 1)
        areas[0] = 0
        k = int(np.argmax(areas))
        if best is None or areas[k] > best[0]:
            best = (int(areas[k]), comps == k, label)
    if best is None:
        return None
    return deepest_point(best[1]), best[2]


# ------------------------------------------------------------------------------------------- object properties
def perimeter(mask: np.ndarray) -> float:
    """Boundary length in pixels (skimage's 4-connected perimeter estimate)."""
    from skimage.measure import perimeter as sk_perimeter
    return float(sk_perimeter(mask, neighborhood=4))


def object_factors(mask: np.ndarray, image: np.ndarray, ring_width: int = 3) -> dict:
    """Properties that may predict failure:

    - ``area``: pixels;
    - ``compactness``: perimeter^2 / (4 pi area), 1 for a disc, larger for complex boundaries;
    - ``contrast``: |mean inside - mean in a ring of ``ring_width`` pixels outside| divided by the pooled
      standard deviation of the two (a contrast-to-noise ratio) on the encoder's first input channel;
    - ``aspect_ratio``: major / minor axis of the pixel coordinates' covariance ellipse (>= 1).
    """
    area = int(mask.sum())
    per = perimeter(mask)
    ring = ndimage.binary_dilation(mask, iterations=ring_width) & ~mask
    inside = image[mask]
    outside = image[ring] if ring.any() else inside
    pooled = np.sqrt((inside.var() + outside.var()) / 2)
    contrast = float(abs(inside.mean() - outside.mean()) / max(pooled, 1e-6))
    ys, xs = np.nonzero(mask)
    if area >= 2:
        ev = np.sort(np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64))))
        aspect = float(np.sqrt((ev[1] + 1 / 12) / (ev[0] + 1 / 12)))  # +1/12: a pixel's own extent
    else:
        aspect = 1.0
    return {"area": area, "compactness": float(per ** 2 / (4 * np.pi * area)) if area else float("nan"),
            "contrast": contrast, "aspect_ratio": aspect}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; NaN if both are empty."""
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int((a & b).sum()) / s
