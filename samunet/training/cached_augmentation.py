"""Augmentation on the cached path: one affine warp for the image, the label and the cached embedding grid.

A frozen encoder's embedding is not equivariant to rotation or scaling, so warping the cached embedding grid only
approximates the embedding of the warped image (``benchmarks/embedding_warp.py`` measures how closely, by cosine
similarity, over the ranges used here; the table is in ``benchmarks/results/embedding_warp.md``). It is still a
better training signal than an unwarped embedding paired with a warped label, and the image path of the hybrid
head sees the exact warped image. Because every layout (encoder input, the hybrid head's canvas, tiles) places the
slice identically on a square of its own size, one affine map in normalised coordinates ([-1, 1] over the square,
``align_corners=False``) applies to all of them at their own resolution.

    warp = random_affine(rng, n, centres, params)                 # (n, 2, 3)
    emb = warp_grid(emb, warp)                                    # (n, D, g, g), bilinear, zero outside
    img = warp_grid(img, warp)                                    # (n, C, Q, Q)
    tgt = warp_labels(tgt, warp)                                  # (n, Q, Q), nearest, IGNORE outside

Rotation is about the centre of the slice's region on the square (not the square's centre), so a slice in the
top-left of a resized layout stays in view. Mirroring is off unless asked for: embeddings of mirrored views are not
cached, and a model trained on mirrored embedding grids would be tested on real ones.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from samunet.preprocessing.encoder_inputs import IGNORE


@dataclass(frozen=True)
class WarpParams:
    rotation_deg: float = 15.0          # uniform in [-r, r] ...
    p_rotation: float = 0.3             # ... for this fraction of samples
    scale: tuple = (0.85, 1.25)         # zoom factor (> 1 magnifies), uniform ...
    p_scale: float = 0.3                # ... for this fraction of samples
    mirror_axes: tuple = ()             # in-plane axes (0: y, 1: x) mirrored with probability 1/2


def random_affine(rng: np.random.Generator, n: int, centres: np.ndarray, params: WarpParams) -> torch.Tensor:
    """``n`` random affine maps ``(n, 2, 3)`` from output to input normalised (x, y) coordinates.

    ``centres`` ``(n, 2)``: each sample's centre of rotation and scaling, normalised (x, y).
    """
    out = np.zeros((n, 2, 3), np.float64)
    for i in range(n):
        a = math.radians(rng.uniform(-params.rotation_deg, params.rotation_deg)) \
            if rng.random() < params.p_rotation else 0.0
        s = rng.uniform(*params.scale) if rng.random() < params.p_scale else 1.0
        m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s
        flips = np.ones(2)
        for ax in params.mirror_axes:  # axis 0 is y (the second normalised coordinate), axis 1 is x
            if rng.random() < 0.5:
                flips[1 - ax] = -1.0
        m = m @ np.diag(flips)
        c = np.asarray(centres[i], np.float64)
        out[i, :, :2] = m
        out[i, :, 2] = c - m @ c
    return torch.from_numpy(out).float()


def is_identity(theta: torch.Tensor) -> torch.Tensor:
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return (theta - eye).abs().flatten(1).amax(1) < 1e-7


def warp_grid(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``(n, C, H, W)`` with the maps ``theta``; zeros outside. Identity maps leave samples untouched."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    keep = is_identity(theta)
    if keep.any():
        out[keep] = x[keep]
    return out


def warp_labels(target: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Class indices ``(n, H, W)`` (``IGNORE`` on padding) warped by nearest neighbour; ``IGNORE`` outside."""
    shifted = (target.float() + 1 - IGNORE)[:, None]  # IGNORE -> 1, classes -> 2.., outside -> 0
    w = warp_grid(shifted, theta, mode="nearest")[:, 0]
    out = w.round().long() - 1 + IGNORE
    out[w < 0.5] = IGNORE
    return out


def region_centres(layouts: list[dict]) -> np.ndarray:
    """Normalised (x, y) centre of the slice's region on each sample's square (resize: top-left part)."""
    c = np.zeros((len(layouts), 2))
    for i, lay in enumerate(layouts):
        if lay["mode"] == "resize":
            h, w = lay["resized"]
            c[i] = [w / lay["size"] - 1.0, h / lay["size"] - 1.0]
    return c


def seed_intensity_augmentation(seed: int) -> None:
    """Seed what ``intensity_augmentation`` draws from: numpy's global state, and Python's ``random`` (the Gaussian
    noise transform draws its variance there), so seeded views and resumed epochs repeat exactly."""
    np.random.seed(seed % 2**32)
    random.seed(seed)


def intensity_augmentation():
    """batchgenerators' intensity transforms with nnU-Net's probabilities, for the image path (seeded by
    ``seed_intensity_augmentation``)."""
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                             ContrastAugmentationTransform, GammaTransform)
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
    return Compose([
        GaussianNoiseTransform((0, 0.01), p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=False, p_per_sample=0.2),
        BrightnessMultiplicativeTransform((0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform((0.75, 1.25), p_per_sample=0.15),
        GammaTransform((0.7, 1.5), retain_stats=True, p_per_sample=0.3),
    ])
