"""From preprocessed slices to encoder inputs and from head outputs back to slices.

A preprocessed case is ``(C, S, Y, X)`` in [0, 1]. For slice ``s`` the configuration's channel rule gives one or
more three-channel images (``replicate``, ``rgb``, ``neighbour_slices``: one; ``encode_each_and_fuse``: one per
channel). The in-plane mode then turns each image into square encoder inputs of side P:

- ``resize``: the longest side is scaled to P (aspect ratio kept, as SAM does) and the rest zero-padded;
- ``sliding_window``: P x P tiles at the target spacing, overlapping by the plan's step, on the slice padded to at
  least P; predictions are blended with a Gaussian weight that favours tile centres.

The same layout maps head logits (T, K, P, P) back to class probabilities on the slice grid (K, Y, X).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -1  # target value of padding


def tile_starts(length: int, patch: int, step: float) -> list[int]:
    if length <= patch:
        return [0]
    n = math.ceil((length - patch) / (patch * step)) + 1
    actual = (length - patch) / (n - 1)
    return [int(round(i * actual)) for i in range(n)]


def make_layout(slice_shape, config: dict) -> dict:
    y, x = (int(v) for v in slice_shape)
    p = int(config["encoder_input_size"])
    if config["inplane_mode"] == "resize":
        scale = p / max(y, x)
        return {"mode": "resize", "size": p, "slice_shape": [y, x],
                "resized": [max(1, min(p, int(round(y * scale)))), max(1, min(p, int(round(x * scale))))],
                "tiles": [[0, 0]]}
    step = float(config.get("tile_step", 0.5))
    tiles = [[a, b] for a in tile_starts(max(y, p), p, step) for b in tile_starts(max(x, p), p, step)]
    return {"mode": "sliding_window", "size": p, "slice_shape": [y, x], "resized": None, "tiles": tiles}


def num_encoder_images(config: dict, num_channels: int) -> int:
    return num_channels if config["channel_rule"]["type"] == "encode_each_and_fuse" else 1


def slice_images(data: np.ndarray, s: int, config: dict) -> np.ndarray:
    """Three-channel images for slice ``s``: ``(n_enc, 3, Y, X)``."""
    rule = config["channel_rule"]["type"]
    n_slices = data.shape[1]
    if config["slice_context"] == 3:
        idx = [max(0, s - 1), s, min(n_slices - 1, s + 1)]
        return np.stack([data[c, idx] for c in range(data.shape[0])]) if rule == "encode_each_and_fuse" \
            else data[0, idx][None]
    if rule == "rgb":
        return data[:, s][None]
    return np.repeat(data[:, s][:, None], 3, axis=1)  # replicate / encode_each_and_fuse


def _resize_pad(t: torch.Tensor, layout: dict, mode: str, fill: float) -> torch.Tensor:
    h, w = layout["resized"]
    p = layout["size"]
    if list(t.shape[-2:]) != [h, w]:
        align = None if mode == "nearest" else False
        t = F.interpolate(t, size=(h, w), mode=mode, align_corners=align)
    return F.pad(t, (0, p - w, 0, p - h), value=fill)


def _tiles(t: torch.Tensor, layout: dict, fill: float) -> torch.Tensor:
    p = layout["size"]
    y, x = t.shape[-2:]
    t = F.pad(t, (0, max(0, p - x), 0, max(0, p - y)), value=fill)
    return torch.stack([t[..., a:a + p, b:b + p] for a, b in layout["tiles"]])


def encoder_inputs(images: np.ndarray, layout: dict) -> torch.Tensor:
    """``(n_enc, 3, Y, X)`` -> ``(T, n_enc, 3, P, P)`` float32."""
    t = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: inputs may be read-only memmaps
    if layout["mode"] == "resize":
        return _resize_pad(t, layout, "bilinear", 0.0).clamp_(0, 1)[None]
    return _tiles(t, layout, 0.0)


def target_inputs(seg: np.ndarray, layout: dict, label_values) -> torch.Tensor:
    """``(Y, X)`` label map -> ``(T, P, P)`` int64 class indices, ``IGNORE`` on padding."""
    label_values = np.asarray(sorted(label_values))
    idx = torch.from_numpy(np.searchsorted(label_values, seg).astype(np.int64))
    if layout["mode"] == "resize":
        k = len(label_values)
        if list(idx.shape) == layout["resized"]:
            onehot = F.one_hot(idx, k).permute(2, 0, 1)[None].float()
        else:
            onehot = F.interpolate(F.one_hot(idx, k).permute(2, 0, 1)[None].float(), size=tuple(layout["resized"]),
                                   mode="bilinear", align_corners=False)
        out = onehot.argmax(1)
        p = layout["size"]
        return F.pad(out, (0, p - out.shape[-1], 0, p - out.shape[-2]), value=IGNORE)
    return _tiles(idx[None], layout, IGNORE)[:, 0]


def gaussian_weight(p: int, sigma_scale: float = 0.125) -> torch.Tensor:
    r = torch.arange(p, dtype=torch.float32) - (p - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * (sigma_scale * p) ** 2))
    w = g[:, None] * g[None, :]
    w = w / w.max()
    return w.clamp_min(w[w > 0].min())


def probabilities_to_slice(logits: torch.Tensor, layout: dict) -> torch.Tensor:
    """Head logits ``(T, K, P, P)`` -> class probabilities ``(K, Y, X)`` on the slice grid."""
    y, x = layout["slice_shape"]
    if layout["mode"] == "resize":
        h, w = layout["resized"]
        lg = logits[:, :, :h, :w]
        if [h, w] != [y, x]:
            lg = F.interpolate(lg.float(), size=(y, x), mode="bilinear", align_corners=False)
        return torch.softmax(lg.float(), 1)[0]
    p = layout["size"]
    probs = torch.softmax(logits.float(), 1)
    k = probs.shape[1]
    acc = torch.zeros((k, max(y, p), max(x, p)))
    wsum = torch.zeros((max(y, p), max(x, p)))
    w = gaussian_weight(p)
    for t, (a, b) in enumerate(layout["tiles"]):
        acc[:, a:a + p, b:b + p] += probs[t] * w
        wsum[a:a + p, b:b + p] += w
    return (acc / wsum)[:, :y, :x]
