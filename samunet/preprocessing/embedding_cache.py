"""Frozen-encoder embedding cache.

The encoder never trains, so each encoder input (a slice, a 2.5D stack or a tile) is encoded once and its embedding
stored as float16 in ``samunet_preprocessed/DatasetXXX/embeddings/<config>_<key>/``:

- ``CASE_emb.npy``: ``(N, n_enc * E, g, g)`` float16, memory-mapped at training time
- ``CASE_target.npy``: ``(N, P, P)`` int16 class indices at the encoder's resolution (-1 on padding)
- ``CASE.json``: which slice and tile each of the N rows is, and the in-plane layout

The key hashes the encoder's identity (name, input size, SHA-256 of its weights), the preprocessing identity and
everything that shapes an encoder input (slice context, channel rule, in-plane mode, tile step), so a cache built
for other weights, another input size or other preprocessing is never used. Cases are written atomically and the
JSON last; an interrupted build resumes with the unfinished cases. Batches are sized from a RAM budget.

What augmentation remains valid on cached embeddings: a frozen ViT/TinyViT embedding is not equivariant to flips,
rotations, scaling or intensity changes of the image, so a warped cached embedding only approximates the embedding
of the warped image (``benchmarks/embedding_warp.py``: on Hippocampus a mean cosine of 0.81-0.92 for rotations up
to 15 degrees and scales 0.85-1.25, against 0.69-0.74 for a mirror). Training from the cache therefore uses
foreground oversampling, random sampling of slices/tiles and feature-space regularisation (Gaussian noise on the
embedding and channel dropout), and the hybrid head adds one affine warp within those ranges for its image, its
label and the embedding grid (``samunet.training.cached_augmentation``), with intensity augmentation on its image
path. Mirroring needs the embeddings of mirrored views: the augmented views of the labelled slices
(``samunet.training.augmented_views``) are encoded as such, and the mirrored views that test-time augmentation
predicts are kept beside the cache on request (``samunet.preprocessing.mirrored_views``); full augmentation of the
encoder's input needs on-the-fly encoding, which training uses when the plan does not cache.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from samunet.preprocessing.encoder_inputs import (encoder_inputs, make_layout, num_encoder_images, slice_images,
                                                  target_inputs)
from samunet.utils import (SamunetError, atomic_memmap, atomic_save_npy, load_json, save_json, stable_hash,
                           sweep_stale_temps)

logger = logging.getLogger("samunet")

CACHE_FORMAT = 1
MAX_ENCODER_BATCH = 64


def cache_key(identity: dict, config: dict) -> str:
    return stable_hash({
        "format": CACHE_FORMAT,
        "encoder": identity,
        "preprocessing_identity": config["preprocessing_identity"],
        "slice_context": config["slice_context"],
        "channel_rule": config["channel_rule"]["type"],
        "inplane_mode": config["inplane_mode"],
        "input_size": config["encoder_input_size"],
        "tile_step": config.get("tile_step"),
    })


def encoder_batch_size(spec, input_size: int, ram_budget_mb: float) -> int:
    """Images per encoder batch that fit the RAM budget (LiteMedSAM: ~180 MB per 256 px image on the CPU)."""
    return int(max(1, min(MAX_ENCODER_BATCH, ram_budget_mb // max(1.0, spec.mb_per_image(input_size)))))


@torch.inference_mode()
def encode_batches(encoder, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(N, 3, P, P)`` in [0, 1] -> ``(N, E, g, g)`` embeddings, computed ``batch_size`` images at a time."""
    device = next(encoder.parameters()).device
    out = [encoder(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def write_case_embeddings(data: np.ndarray, config: dict, encoder, batch: int, path: Path, view: tuple = ()) -> dict:
    """Encode every slice of a preprocessed case ``data`` ``(C, S, Y, X)``, flipped along the in-plane axes ``view``
    first (``()``: as is; ``(-1,)``: X ...), and write the embeddings ``(S * T, n_enc * E, g, g)`` float16 to
    ``path``, rows slice-major and tile-minor, ``batch`` encoder images at a time. They go straight into a
    memory-mapped file under a unique temporary name, renamed when complete: a large case never has to fit in RAM,
    and two runs encoding the same case never write into one file. Returns the in-plane layout."""
    layout = make_layout(data.shape[2:], config)
    n_enc = num_encoder_images(config, data.shape[0])
    n_tiles = len(layout["tiles"])
    p = config["encoder_input_size"]
    e, g, _ = encoder.spec.embedding_shape(p)
    step = max(1, batch // (n_tiles * n_enc))  # slices per encoder batch
    with atomic_memmap(path, (data.shape[1] * n_tiles, n_enc * e, g, g)) as out:
        for start in range(0, data.shape[1], step):
            stop = min(data.shape[1], start + step)
            x = torch.cat([encoder_inputs(np.ascontiguousarray(np.flip(slice_images(data, s, config), view)), layout)
                           for s in range(start, stop)])  # (n * T, n_enc, 3, P, P)
            emb = encode_batches(encoder, x.reshape(-1, 3, p, p), batch)
            out[start * n_tiles:stop * n_tiles] = emb.reshape(len(x), n_enc * e, g, g).half().numpy()
    return layout


class EmbeddingCache:
    def __init__(self, dataset_folder: Path, config_name: str, config: dict, identity: dict, label_values):
        self.config = config
        self.config_name = config_name
        self.identity = identity
        self.label_values = list(label_values)
        self.key = cache_key(identity, config)
        # configurations with the same encoder inputs (2d and 2.5d_emb) share one cache: same key, same folder
        self.folder = Path(dataset_folder) / "embeddings" / f"{config.get('embedding_cache', config_name)}_{self.key}"
        self.data_folder = Path(dataset_folder) / config["data_identifier"]

    def is_done(self, identifier: str) -> bool:
        return all((self.folder / f"{identifier}{s}").is_file() for s in ("_emb.npy", "_target.npy", ".json"))

    def missing(self, identifiers) -> list[str]:
        return [i for i in identifiers if not self.is_done(i)]

    def build(self, identifiers, encoder, ram_budget_mb: float = 4000.0) -> int:
        """Encode every listed case not yet cached. Returns the number of encoder inputs computed."""
        todo = self.missing(identifiers)
        self.folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(self.folder)  # only dead writers' files: another run may be encoding into this cache
        save_json({"encoder": self.identity, "configuration": self.config_name,
                   "preprocessing_identity": self.config["preprocessing_identity"], "key": self.key},
                  self.folder / "cache_identity.json")
        if not todo:
            return 0
        if len(todo) < len(identifiers):
            logger.info("embedding cache: %d of %d case(s) already encoded", len(identifiers) - len(todo),
                        len(identifiers))
        batch = encoder_batch_size(encoder.spec, self.config["encoder_input_size"], ram_budget_mb)
        total = 0
        with tqdm(todo, desc=f"encode {self.config_name} (batch {batch})", unit="case") as bar:
            for ident in bar:
                total += self._build_case(ident, encoder, batch)
                bar.set_postfix(inputs=total)
        return total

    def _build_case(self, ident: str, encoder, batch: int) -> int:
        data_file = self.data_folder / f"{ident}.npy"
        seg_file = self.data_folder / f"{ident}_seg.npy"
        if not data_file.is_file():
            raise SamunetError(f"{data_file}: preprocessed case not found; run samunet_preprocess first")
        data = np.load(data_file, mmap_mode="r")
        seg = np.load(seg_file, mmap_mode="r") if seg_file.is_file() else None
        layout = write_case_embeddings(data, self.config, encoder, batch, self.folder / f"{ident}_emb.npy")
        rows = [[s, t] for s in range(data.shape[1]) for t in range(len(layout["tiles"]))]
        targets = [target_inputs(np.asarray(seg[s]), layout, self.label_values)
                   for s in range(data.shape[1])] if seg is not None else []
        tgt = torch.cat(targets).short().numpy() if targets else np.zeros((0,), np.int16)
        atomic_save_npy(self.folder / f"{ident}_target.npy", tgt)
        save_json({"rows": rows, "layout": layout, "num_slices": int(data.shape[1])}, self.folder / f"{ident}.json")
        return len(rows)

    def load(self, identifier: str):
        """Memory-mapped embeddings, targets and the row index of one case."""
        if not self.is_done(identifier):
            raise SamunetError(f"case {identifier} is not in the embedding cache {self.folder}")
        return (np.load(self.folder / f"{identifier}_emb.npy", mmap_mode="r"),
                np.load(self.folder / f"{identifier}_target.npy", mmap_mode="r"),
                load_json(self.folder / f"{identifier}.json"))
