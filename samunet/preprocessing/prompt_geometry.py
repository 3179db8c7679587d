"""Prompts and masks between a slice's own pixel grid and the square encoder input of a ``resize`` layout.

SAM takes prompts in the pixel coordinates of its S x S input (x before y) and returns low-resolution logits
(L x L, L = 4 x the embedding grid) over that whole input. A slice of Y x X pixels is resized so that its longest
side is S and zero-padded after (``make_layout``); ``SliceGeometry`` maps slice points and boxes in, logits out,
and a mask given on the slice grid (a trained model's prediction, say) to the logits SAM takes as its mask prompt.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MASK_LOGIT_CLIP = 6.0   # a mask prompt made from probabilities: logit(p) clipped to +-6 (p = 0.0025 ... 0.9975)


def probabilities_to_logits(prob: torch.Tensor) -> torch.Tensor:
    """Foreground probabilities (or a 0/1 mask) -> clipped logits, the form of SAM's mask prompt."""
    return torch.logit(prob.float().clamp(0, 1), eps=1e-6).clamp(-MASK_LOGIT_CLIP, MASK_LOGIT_CLIP)


class SliceGeometry:
    """Maps slice-grid prompts to encoder-input pixels and decoder logits back to the slice grid (resize mode:
    the longest side scaled to P, zero padding after)."""

    def __init__(self, layout: dict, low_res_size: int):
        self.slice_shape = tuple(layout["slice_shape"])
        self.resized = tuple(layout["resized"])
        self.size = layout["size"]
        self.low_res_size = low_res_size
        self.scale = np.array([self.resized[1] / self.slice_shape[1], self.resized[0] / self.slice_shape[0]])

    def points(self, pts: np.ndarray) -> torch.Tensor:
        """(..., 2) slice x, y at pixel centres -> encoder pixels, kept inside the image."""
        p = (np.asarray(pts, np.float64) + 0.5) * self.scale - 0.5
        p = np.clip(p, 0, np.array([self.resized[1] - 1, self.resized[0] - 1]))
        return torch.from_numpy(p).float()

    def boxes(self, boxes: np.ndarray) -> torch.Tensor:
        """(N, 4) inclusive slice boxes -> encoder boxes covering the same pixels, kept inside the image."""
        b = np.asarray(boxes, np.float64)
        out = np.concatenate([b[:, :2] * self.scale, (b[:, 2:] + 1) * self.scale - 1], 1)
        hi = np.array([self.resized[1] - 1, self.resized[0] - 1] * 2, np.float64)
        return torch.from_numpy(np.clip(out, 0, hi)).float()

    def logits_to_slice(self, low: torch.Tensor) -> torch.Tensor:
        """(N, M, L, L) decoder logits -> (N, M, Y, X) logits on the slice grid (as SAM's postprocess_masks)."""
        low = low.float().cpu()
        if low.shape[-1] != self.size:
            low = F.interpolate(low, size=(self.size, self.size), mode="bilinear", align_corners=False)
        low = low[..., :self.resized[0], :self.resized[1]]
        if tuple(low.shape[-2:]) != self.slice_shape:
            low = F.interpolate(low, size=self.slice_shape, mode="bilinear", align_corners=False)
        return low

    def mask_prompt(self, prob: np.ndarray) -> torch.Tensor:
        """(N, Y, X) foreground probabilities (or 0/1 masks) on the slice grid -> (N, 1, L, L) mask-prompt logits:
        resized like the image, background on the padding, brought to the decoder's low resolution."""
        t = torch.as_tensor(np.asarray(prob, np.float32))[:, None]
        if tuple(t.shape[-2:]) != self.resized:
            t = F.interpolate(t, size=self.resized, mode="bilinear", align_corners=False)
        t = F.pad(t, (0, self.size - self.resized[1], 0, self.size - self.resized[0]), value=0.0)
        if self.low_res_size != self.size:
            t = F.interpolate(t, size=(self.low_res_size, self.low_res_size), mode="bilinear", align_corners=False)
        return probabilities_to_logits(t)
