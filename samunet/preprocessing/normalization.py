"""Intensity normalisation: every scheme maps a channel into [0, 1], the range samunet's encoders take.

Each encoder then applies its own input normalisation (LiteMedSAM: per-image min-max; SAM: 0-255 and pixel
mean/std), so the preprocessed data do not depend on the encoder.

Schemes
- ``ct_window``: clip to the data set's foreground 0.5/99.5 percentiles (from the fingerprint), scale to [0, 1].
- ``percentile_clip``: clip each image to its own 0.5/99.5 percentiles of non-zero voxels, scale to [0, 1]
  (MRI and other modalities without absolute units).
- ``natural_8bit``: divide by the range of the stored integer type (RGB or grey PNG as is).
"""
from __future__ import annotations

import numpy as np

from samunet.planning.plans_checks import NORMALIZATION_SCHEMES as SCHEMES


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalise_channel(x: np.ndarray, scheme: str, params: dict) -> tuple[np.ndarray, dict]:
    """Normalise one channel; returns the result and the values used (stored with the case)."""
    if scheme == "ct_window":
        lo, hi = float(params["lower"]), float(params["upper"])
    elif scheme == "percentile_clip":
        values = x[x != 0]
        if values.size == 0:
            values = x.ravel()
        lo, hi = (float(v) for v in np.percentile(values, [params.get("lower_percentile", 0.5),
                                                           params.get("upper_percentile", 99.5)]))
    elif scheme == "natural_8bit":
        lo, hi = 0.0, float(params.get("max_value", 255.0))
    else:
        raise ValueError(f"unknown normalisation scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    return _scale(x, lo, hi), {"lower": lo, "upper": hi}


def normalise(data: np.ndarray, schemes: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """Normalise ``(C, ...)`` data channel by channel with ``schemes[c] = {"scheme": ..., **params}``."""
    out = np.empty(data.shape, dtype=np.float32)
    used = []
    for c in range(data.shape[0]):
        out[c], u = normalise_channel(data[c], schemes[c]["scheme"], schemes[c])
        used.append(u)
    return out, used
