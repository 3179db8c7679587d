"""Exact embeddings of augmented views of the labelled slices: strong augmentation when labels are few.

A warped cached embedding only approximates the embedding of the warped slice (cosine 0.81-0.92 up to 15 degrees
of rotation on Hippocampus, 0.68 at 30, 0.69-0.74 for a mirror; ``benchmarks/embedding_warp.py``), so warps on the
cache must stay mild. With few labelled cases the encoder can simply see the augmented slices: each labelled slice
(or tile) gets ``V`` views, each with nnU-Net-like augmentation (rotation over the full circle and scaling
0.7-1.4, each for half of the views, mirroring of each in-plane axis with probability 1/2, batchgenerators'
intensity transforms), encoded once and stored beside the embedding cache:

    views = AugmentedViews(cache, canvas=64, views=16)
    views.build(train_ids, encoder)          # V x (slices x tiles) encoder calls per case, resumable
    emb, target, images = views.load(ident)  # (V*N, D, g, g) float16, (V*N, S, S) int16, (V*N, 3k, Q, Q) or None

``S`` is the canvas for the hybrid head (``canvas``) or the encoder input otherwise. Views are seeded by (seed,
case, view), stored per case atomically under ``<cache folder>/views_<key>/`` (the key hashes the augmentation,
the number of views, the canvas and the seed) and rebuilt only when missing. Because views include mirrored
slices with their true embeddings, a model trained on them can be predicted with mirroring test-time augmentation.

How many views: ``views_for`` spends at most a budget of encoder calls, ``views_budget`` turns the plans' rule
(``augmented_views``: encoder seconds per input, head seconds per sample, a budget in seconds) into calls for one
run: no more encoder time than the budget (4000 LiteMedSAM calls at 128 px: 64 views for one Hippocampus case, 22
for 5, 5 for 20, none for a whole training set or for a data set of many large tiles), at most the rule's
``max_views`` per input, and no more than the head time of the run's cap, so a short run (the demo) spends nothing
on views; ``default_views`` combines the two.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from samunet.planning.planner import MAX_VIEWS
from samunet.preprocessing.embedding_cache import encode_batches, encoder_batch_size
from samunet.preprocessing.encoder_inputs import (encoder_inputs, make_layout, num_encoder_images, slice_images,
                                                  target_inputs)
from samunet.training.cached_augmentation import (WarpParams, intensity_augmentation, random_affine,
                                                  region_centres, seed_intensity_augmentation, warp_grid,
                                                  warp_labels)
from samunet.utils import atomic_memmap, atomic_save_npy, load_json, save_json, stable_hash, sweep_stale_temps

logger = logging.getLogger("samunet")

VIEW_BUDGET = 4000          # encoder calls spent on augmented views of one training run at most (plans without a rule)
LEGACY_MAX_VIEWS = 16       # views per labelled input at most for plans whose rule predates its max_views
VIEW_WARP = WarpParams(rotation_deg=180.0, p_rotation=0.5, scale=(0.7, 1.4), p_scale=0.5, mirror_axes=(0, 1))


def views_for(num_inputs: int, budget: int = VIEW_BUDGET, max_views: int = MAX_VIEWS) -> int:
    """Views per labelled encoder input within the budget; 0 when fewer than 2 would fit."""
    v = min(max_views, budget // max(1, num_inputs))
    return int(v) if v >= 2 else 0


def views_budget(rule: dict | None, samples: int) -> tuple[int, str]:
    """Encoder calls a run drawing ``samples`` training samples may spend on views, and why."""
    if not rule:
        return VIEW_BUDGET, f"the plans have no augmented_views rule: at most {VIEW_BUDGET} encoder calls"
    head_s = samples * rule["head_s_per_sample"]
    seconds = min(rule["budget_s"], head_s)
    calls = int(seconds // rule["encoder_s_per_input"])
    return calls, (f"{calls} encoder calls: {seconds:.0f} s (the lesser of the {rule['budget_s']:.0f} s budget and the "
                   f"head time of {samples} samples) at {rule['encoder_s_per_input']:.2f} s per input")


def default_views(rule: dict | None, num_inputs: int, samples: int) -> tuple[int, str]:
    """Views per labelled input for a run of ``samples`` training samples on ``num_inputs`` labelled encoder inputs
    under the plans' rule (checked with the plans, ``samunet.planning.plans_checks``), and why."""
    calls, why = views_budget(rule, samples)
    return views_for(num_inputs, calls, (rule or {}).get("max_views", LEGACY_MAX_VIEWS)), why


class AugmentedViews:
    def __init__(self, cache, canvas: int | None, views: int, seed: int = 12345):
        self.cache, self.canvas, self.views, self.seed = cache, canvas, int(views), int(seed)
        self.config = cache.config
        per_view = {"per_view_warp": True} if int(self.config.get("embedding_context", 1)) > 1 else {}
        key = stable_hash({**per_view, "warp": VIEW_WARP.__dict__, "views": self.views, "canvas": canvas,
                           "seed": self.seed,
                           "intensity": "batchgenerators noise, blur, brightness, contrast, gamma (nnU-Net p)"})
        self.folder = cache.folder / f"views_{key}"

    def _files(self, ident: str) -> list:
        return [self.folder / f"{ident}{s}" for s in ("_emb.npy", "_target.npy", "_img.npy", ".json")]

    def is_done(self, ident: str) -> bool:
        files = self._files(ident)
        return all(f.is_file() for f in files if f.name.endswith((".json", "_emb.npy", "_target.npy"))) and \
            (self.canvas is None or files[2].is_file())

    def build(self, identifiers, encoder, ram_budget_mb: float = 4000.0) -> int:
        todo = [i for i in identifiers if not self.is_done(i)]
        if not todo:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(self.folder)  # only dead writers' files
        batch = encoder_batch_size(encoder.spec, self.config["encoder_input_size"], ram_budget_mb)
        transform = intensity_augmentation()
        total = 0
        for ident in tqdm(todo, desc=f"encode {self.views} augmented views", unit="case"):
            total += self._build_case(ident, encoder, batch, transform)
        return total

    def _build_case(self, ident: str, encoder, batch: int, transform) -> int:
        data = np.load(self.cache.data_folder / f"{ident}.npy", mmap_mode="r")
        seg = np.load(self.cache.data_folder / f"{ident}_seg.npy", mmap_mode="r")
        layout = make_layout(data.shape[2:], self.config)
        canvas = None if self.canvas is None else \
            make_layout(data.shape[2:], {**self.config, "encoder_input_size": int(self.canvas)})
        out_layout = canvas or layout
        f_emb, f_tgt, f_img, f_json = self._files(ident)
        # the views' embeddings (the bulk: 2 MB per input at 256 px) go straight into a memory-mapped file, as the
        # cache's do, so a case's views never have to fit in RAM
        e, g, _ = encoder.spec.embedding_shape(self.config["encoder_input_size"])
        rows_per_view = data.shape[1] * len(layout["tiles"])
        with atomic_memmap(f_emb, (self.views * rows_per_view, num_encoder_images(self.config, data.shape[0]) * e,
                                   g, g)) as out:
            targets, images, rows = self._encode_views(ident, data, seg, layout, canvas, encoder, batch, transform,
                                                       out)
        atomic_save_npy(f_tgt, torch.cat(targets).numpy())
        if images:
            atomic_save_npy(f_img, torch.cat(images).numpy())
        save_json({"rows": rows, "layout": out_layout, "views": self.views}, f_json)
        return len(rows)

    def _encode_views(self, ident, data, seg, layout, canvas, encoder, batch, transform, out):
        """Encode the views of one case into ``out`` (view-major rows); returns their targets, canvas images and
        (view, slice, tile) rows."""
        out_layout = canvas or layout
        targets, images, rows = [], [], []
        case_seed = int(stable_hash(ident, 8), 16)
        for v in range(self.views):
            # each slice gets its own warp and intensity change, except where the head fuses neighbouring slices
            # (2.5d_emb): there one per view keeps the slices of a view aligned
            rng = np.random.default_rng([self.seed, case_seed, v])
            view_seed = int(rng.integers(2 ** 31))
            seed_intensity_augmentation(view_seed)  # batchgenerators draws from global states
            per_view = int(self.config.get("embedding_context", 1)) > 1
            view_theta = random_affine(rng, 1, region_centres([layout]), VIEW_WARP) if per_view else None
            xs, cs, ts = [], [], []
            for s in range(data.shape[1]):
                img = slice_images(data, s, self.config)  # (n_enc, 3, Y, X)
                if per_view:
                    seed_intensity_augmentation(view_seed)
                # a copy: an RGB slice is a read-only view of the memory-mapped case, which the transforms write into
                d = transform(data=np.array(img.reshape(1, -1, *img.shape[-2:]), dtype=np.float32))
                img = np.clip(d["data"][0], 0, 1).reshape(img.shape)
                x = encoder_inputs(img, layout)                                 # (T, n_enc, 3, P, P)
                theta = view_theta if per_view else random_affine(rng, 1, region_centres([layout]), VIEW_WARP)
                theta = theta.expand(len(x), 2, 3)
                xs.append(warp_grid(x.flatten(1, 2), theta).view_as(x))
                t = target_inputs(np.asarray(seg[s]), out_layout, self.cache.label_values)  # (T, S, S)
                ts.append(warp_labels(t, theta))
                if canvas is not None:
                    c = encoder_inputs(img, canvas).flatten(1, 2)               # (T, 3k, Q, Q)
                    cs.append(warp_grid(c, theta))
                rows += [[v, s, k] for k in range(len(x))]
            x = torch.cat(xs)
            emb = encode_batches(encoder, x.flatten(0, 1), batch)
            out[v * len(x):(v + 1) * len(x)] = emb.reshape(len(x), *out.shape[1:]).half().numpy()
            targets.append(torch.cat(ts).short())
            if cs:
                images.append(torch.cat(cs).half())
        return targets, images, rows

    def load(self, ident: str):
        f_emb, f_tgt, f_img, f_json = self._files(ident)
        return (np.load(f_emb, mmap_mode="r"), np.load(f_tgt, mmap_mode="r"),
                np.load(f_img, mmap_mode="r") if self.canvas is not None else None, load_json(f_json))

