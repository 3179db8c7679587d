"""Slice-wise prediction shared by final validation and ``samunet_predict``.

For each slice the frozen encoder runs once per test-time-augmentation view; every fold's head reuses that
embedding, so an ensemble of five folds costs one encoder pass, not five. Class probabilities are averaged over
heads (folds) and views, blended over tiles with a Gaussian weight in sliding-window mode, and mapped back through
every preprocessing step to the original file's geometry. Models that read images instead of embeddings (the
from-scratch U-Net, ``takes_images``) get each view of the slice on their canvas directly; with only such models no
encoder is needed (``encoder=None``).
"""
from __future__ import annotations

import numpy as np
import torch

from samunet.preprocessing.encoder_inputs import encoder_inputs, make_layout, probabilities_to_slice, slice_images
from samunet.preprocessing.preprocessor import revert_probabilities

# mirroring views for test-time augmentation: flipped in-plane axes of a (..., Y, X) slice
TTA_VIEWS = [(), (-1,), (-2,), (-2, -1)]


def _flip(a, axes):
    if not axes:
        return a
    if isinstance(a, torch.Tensor):
        return torch.flip(a, axes)
    return np.flip(a, axes)


@torch.inference_mode()
def predict_preprocessed(data: np.ndarray, config: dict, encoder, heads: list, num_classes: int, tta: bool = True,
                         cached_embeddings=None, batch_size: int = 16, device="cpu") -> np.ndarray:
    """Class probabilities ``(K, S, Y, X)`` for a preprocessed case ``(C, S, Y, X)``.

    ``cached_embeddings`` (rows in slice-major, tile-minor order, as the embedding cache stores them) replace the
    encoder for the un-flipped view; a dict ``{view: embeddings}`` (``TTA_VIEWS`` keys, as ``MirroredViews``
    gives) for every view it holds.
    """
    if not isinstance(cached_embeddings, dict):
        cached_embeddings = {} if cached_embeddings is None else {(): cached_embeddings}
    image_models = [getattr(h, "takes_images", False) for h in heads]
    hybrids = [getattr(h, "takes_images_and_embeddings", False) for h in heads]
    if encoder is None and not all(image_models):
        raise ValueError("embedding heads need the encoder (only image models such as the U-Net run without one)")
    s_count = data.shape[1]
    layout = make_layout(data.shape[2:], config)
    # the hybrid heads and the U-Net read the slice on their own canvas, laid out like the encoder input at another
    # size (a U-Net of older plans has none: it reads the encoder input)
    on_own_canvas = [hy or (im and getattr(h, "input_size", None) is not None)
                     for h, im, hy in zip(heads, image_models, hybrids)]
    canvases = {h.input_size: make_layout(data.shape[2:], {**config, "encoder_input_size": h.input_size})
                for h, c in zip(heads, on_own_canvas) if c}
    n_tiles = len(layout["tiles"])
    views = TTA_VIEWS if tta else TTA_VIEWS[:1]
    out = np.zeros((num_classes, s_count, *data.shape[2:]), np.float32)
    slices_per_chunk = max(1, batch_size // n_tiles)
    weight = 1.0 / (len(views) * len(heads))
    context = int(config.get("embedding_context", 1))  # 2.5d_emb: heads fuse the embeddings of s-1, s, s+1
    halo = 1 if context > 1 else 0
    for start in range(0, s_count, slices_per_chunk):
        chunk = range(start, min(s_count, start + slices_per_chunk))
        ext = range(max(0, start - halo), min(s_count, chunk.stop + halo))  # slices whose embeddings are needed
        inner = slice((chunk.start - ext.start) * n_tiles, (chunk.stop - ext.start) * n_tiles)
        for view in views:
            x = emb = None
            images = {s: np.ascontiguousarray(_flip(slice_images(data, s, config), view)) for s in ext}
            if any(im and not c for im, c in zip(image_models, on_own_canvas)) or \
                    (not all(image_models) and view not in cached_embeddings):
                x = torch.cat([encoder_inputs(images[s], layout) for s in ext]).to(device)  # (n*T, n_enc, 3, P, P)
            if not all(image_models):
                if view in cached_embeddings:
                    emb = torch.from_numpy(np.asarray(
                        cached_embeddings[view][ext.start * n_tiles:ext.stop * n_tiles], dtype=np.float32)).to(device)
                else:
                    e = encoder(x.reshape(-1, *x.shape[2:])).float()
                    emb = e.reshape(x.shape[0], x.shape[1] * e.shape[1], *e.shape[2:])
                emb = _with_context(emb, chunk, ext, n_tiles, context, s_count)
            if x is not None:
                x = x[inner]
            on_canvas = {q: torch.cat([encoder_inputs(images[s], lay) for s in chunk]).flatten(1, 2).to(device)
                         for q, lay in canvases.items()}  # (n*T, n_enc * 3, Q, Q)
            for head, takes_images, hybrid, own in zip(heads, image_models, hybrids, on_own_canvas):
                if hybrid:
                    logits, head_layout = head(emb, on_canvas[head.input_size]), canvases[head.input_size]
                elif own:
                    logits, head_layout = head(on_canvas[head.input_size]), canvases[head.input_size]
                else:
                    inp = x.reshape(x.shape[0], -1, *x.shape[3:]) if takes_images else emb
                    logits, head_layout = head(inp), layout
                logits = logits.float().cpu()
                for i, s in enumerate(chunk):
                    probs = probabilities_to_slice(logits[i * n_tiles:(i + 1) * n_tiles], head_layout)
                    out[:, s] += weight * _flip(probs, view).numpy()
    return out


def slice_probabilities(data: np.ndarray, s: int, config: dict, encoder, heads: list, num_classes: int,
                        device="cpu") -> np.ndarray:
    """Mean class probabilities ``(K, Y, X)`` of ``heads`` on slice ``s`` of a preprocessed case ``(C, S, Y, X)``,
    without mirroring; heads that fuse neighbouring slices' embeddings get slices s-1..s+1, as in the whole case."""
    halo = 1 if int(config.get("embedding_context", 1)) > 1 else 0
    lo, hi = max(0, s - halo), min(data.shape[1], s + halo + 1)
    probs = predict_preprocessed(np.asarray(data[:, lo:hi]), config, encoder, heads, num_classes, tta=False,
                                 device=device)
    return probs[:, s - lo]


def _with_context(emb: torch.Tensor, chunk: range, ext: range, n_tiles: int, context: int,
                  s_count: int) -> torch.Tensor:
    """Embeddings of the slices in ``ext`` -> each ``chunk`` slice's own (context 1), or those of s-1, s, s+1
    concatenated along channels (context 3; the edge slice repeated), rows slice-major, tile-minor."""
    if context == 1:
        return emb[(chunk.start - ext.start) * n_tiles:(chunk.stop - ext.start) * n_tiles]
    rows = []
    for s in chunk:
        for t in range(n_tiles):
            near = [(min(max(n, 0), s_count - 1) - ext.start) * n_tiles + t for n in (s - 1, s, s + 1)]
            rows.append(torch.cat([emb[i] for i in near]))
    return torch.stack(rows)


def probabilities_to_segmentation(probs_pp: np.ndarray, properties: dict,
                                  label_values) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed-space probabilities -> (label map, probabilities) in the original array's geometry."""
    probs = revert_probabilities(probs_pp, properties)
    seg = np.asarray(sorted(label_values))[probs.argmax(0)]
    return seg, probs
