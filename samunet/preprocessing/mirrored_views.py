"""Cached embeddings of the mirrored views that test-time augmentation predicts.

Mirroring test-time augmentation predicts every slice in four views (as is, flipped left-right, up-down, both). The
embedding cache holds the first; the frozen encoder is not equivariant to flips, so the other three have to be
encoded, which makes a validation with mirroring about four times as expensive as one without on a CPU. Every
model validated on the same cases (several heads on one fold, a study of many cells) encodes the same mirrored
slices again. ``samunet_train --cache_tta_views`` keeps them instead, beside the cache they extend:

    <cache folder>/mirrored/CASE_flip<axes>.npy    (N, n_enc * E, g, g) float16, rows as CASE_emb.npy

``<axes>`` names the flipped in-plane axes of a ``(..., Y, X)`` slice: ``1`` for X, ``2`` for Y, ``21`` for both.
They live under the cache folder, whose key hashes the encoder, its weights, the precision path and the
preprocessing, so a view encoded by another encoder is never read. Each file is written atomically; a case whose
views are missing or unreadable is encoded again. The views are encoded exactly as the predictor encodes them (the
slice's encoder images flipped, then tiled), so a prediction that reads them equals one that encodes them up to the
float16 rounding the un-flipped view already has.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from samunet.preprocessing.embedding_cache import encoder_batch_size, write_case_embeddings

MIRRORED = [(-1,), (-2,), (-2, -1)]  # the flipped views of the predictor's TTA_VIEWS, the un-flipped one aside


class MirroredViews:
    """Mirrored-view embeddings of the cases of one ``EmbeddingCache``."""

    def __init__(self, cache, ram_budget_mb: float = 4000.0):
        self.cache, self.config = cache, cache.config
        self.folder = cache.folder / "mirrored"
        self.ram_budget_mb = ram_budget_mb

    def file(self, ident: str, view: tuple) -> Path:
        return self.folder / f"{ident}_flip{''.join(str(-a) for a in view)}.npy"

    def _read(self, ident: str, view: tuple, rows: int):
        try:
            a = np.load(self.file(ident, view), mmap_mode="r")
        except (OSError, ValueError):  # missing or half-written by a run that died: encode it again
            return None
        return a if a.shape[0] == rows else None

    def embeddings(self, ident: str, data: np.ndarray, encoder) -> dict:
        """``{view: (N, n_enc * E, g, g)}`` for every view of test-time augmentation, the un-flipped one from the
        cache; the mirrored ones from this store, encoded and stored first where missing. ``data`` is the
        preprocessed case ``(C, S, Y, X)``."""
        plain = self.cache.load(ident)[0]
        out = {(): plain}
        for view in MIRRORED:
            emb = self._read(ident, view, len(plain))
            if emb is None:
                self.encode(data, view, encoder, self.file(ident, view))
                emb = self._read(ident, view, len(plain))
            out[view] = emb
        return out

    def encode(self, data: np.ndarray, view: tuple, encoder, path: Path) -> None:
        """Write the embeddings of the ``view``-flipped slices of a case ``(C, S, Y, X)`` to ``path``."""
        batch = encoder_batch_size(encoder.spec, self.config["encoder_input_size"], self.ram_budget_mb)
        write_case_embeddings(data, self.config, encoder, batch, path, view)
