"""Training batches: from the embedding cache, or encoded on the fly with batchgenerators augmentation.

Sampling follows nnU-Net: a third of each batch is forced to contain foreground (a class is picked uniformly among
the foreground classes, then a slice or tile containing it); the rest is drawn uniformly. Randomness comes from a
generator seeded with (seed, epoch), so a resumed run draws exactly the batches an uninterrupted run would.
Batches are produced by a background thread so the model does not wait for the disk.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from samunet.preprocessing.encoder_inputs import encoder_inputs, make_layout, slice_images, target_inputs

OVERSAMPLE_FOREGROUND = 0.33


class _RowSampler:
    """Holds, for each sampleable row, which foreground classes it contains."""

    def __init__(self, presence: np.ndarray):
        self.presence = presence  # (rows, K-1) bool
        self.by_class = [np.flatnonzero(presence[:, c]) for c in range(presence.shape[1])]
        self.with_any = [c for c, rows in enumerate(self.by_class) if len(rows)]

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        rows = rng.integers(0, len(self.presence), n)
        if self.with_any:
            forced = rng.random(n) < OVERSAMPLE_FOREGROUND
            for i in np.flatnonzero(forced):
                cls = self.with_any[rng.integers(len(self.with_any))]
                rows[i] = self.by_class[cls][rng.integers(len(self.by_class[cls]))]
        return rows


class CachedData:
    """Rows of the embedding cache for a set of cases (and of their augmented views, if given).

    With ``canvas`` (the hybrid head) each row also yields its image and label on the head's ``canvas`` x
    ``canvas`` layout, read from the preprocessed case. With ``warp`` (``WarpParams``) each sample's embedding grid,
    label and image are warped by one random affine map (``cached_augmentation``); images also get intensity
    augmentation. ``views`` (``AugmentedViews``) adds the stored augmented views of every case as further rows.
    With the configuration's ``embedding_context`` of 3 (``2.5d_emb``), each row's embedding is those of slices
    s-1, s, s+1 (the same tile and view; the edge slice repeated) concatenated along channels. ``segs``
    (``{case: (S, Y, X) label values}``, with ``canvas`` only) replaces the cases' reference labels, in the targets
    and in the foreground sampling alike (self-training's pseudo-labels: the reference is never read).
    """

    def __init__(self, cache, identifiers: list[str], num_classes: int, canvas: int | None = None, warp=None,
                 views=None, segs: dict | None = None):
        if segs is not None and canvas is None:
            raise ValueError("labels other than the reference need the hybrid head's canvas")
        self.config = cache.config
        self.label_values = cache.label_values
        self.canvas = canvas
        self.warp = warp
        cfg = {**cache.config, "encoder_input_size": int(canvas)} if canvas is not None else None
        # one item per case and source: embeddings, targets, images (None: made from the case), row info, case
        self.items = []
        for ident in identifiers:
            emb, tgt, info = cache.load(ident)
            case = None
            if canvas is not None:
                data = np.load(cache.data_folder / f"{ident}.npy", mmap_mode="r")
                seg = np.load(cache.data_folder / f"{ident}_seg.npy", mmap_mode="r") if segs is None else segs[ident]
                case = (data, seg, make_layout(data.shape[2:], cfg))
                info = {**info, "layout": case[2]}
                if segs is not None:  # the cache's targets hold the reference: those of the given labels instead
                    tgt = torch.cat([target_inputs(np.asarray(seg[s]), case[2], self.label_values)
                                     for s in range(data.shape[1])]).numpy()
            self.items.append((emb, tgt, None, info, case))
            if views is not None:
                v_emb, v_tgt, v_img, v_info = views.load(ident)
                self.items.append((v_emb, v_tgt, v_img, v_info, None))
        self.index = np.array([(ci, r) for ci, item in enumerate(self.items) for r in range(len(item[0]))])
        self.context = int(cache.config.get("embedding_context", 1))
        self.neighbours = [neighbour_rows(item[3]["rows"]) for item in self.items] if self.context > 1 else None
        presence = np.zeros((len(self.index), max(0, num_classes - 1)), bool)
        row = 0
        for item in self.items:
            t = np.asarray(item[1]).reshape(len(item[1]), -1)
            for c in range(1, num_classes):
                presence[row:row + len(t), c - 1] = (t == c).any(1)
            row += len(t)
        self.sampler = _RowSampler(presence)
        if warp is not None and canvas is not None:
            from samunet.training.cached_augmentation import intensity_augmentation
            self.intensity = intensity_augmentation()

    def __len__(self):
        return len(self.index)

    def _canvas_row(self, ci: int, k: int):
        emb, tgt, images, info, case = self.items[ci]
        if images is not None:  # a stored augmented view
            return torch.from_numpy(np.asarray(images[k], dtype=np.float32)), \
                torch.from_numpy(np.asarray(tgt[k], dtype=np.int64))
        data, seg, layout = case
        s, t = info["rows"][k]
        img = encoder_inputs(slice_images(data, int(s), self.config), layout)[t]      # (n_enc, 3, Q, Q)
        tgt = target_inputs(np.asarray(seg[s]), layout, self.label_values)[t]          # (Q, Q)
        return img.reshape(-1, *img.shape[-2:]), tgt

    def batch(self, rows, rng: np.random.Generator | None = None) -> dict:
        embs, tgts, imgs, layouts = [], [], [], []
        for r in rows:
            ci, k = self.index[r]
            emb, tgt, _, info, _ = self.items[ci]
            ks = [k] if self.neighbours is None else [self.neighbours[ci][0][k], k, self.neighbours[ci][1][k]]
            embs.append(torch.from_numpy(np.concatenate([np.asarray(emb[j], dtype=np.float32) for j in ks])))
            layouts.append(info["layout"])
            if self.canvas is None:
                tgts.append(torch.from_numpy(np.asarray(tgt[k], dtype=np.int64)))
            else:
                img, t = self._canvas_row(ci, k)
                imgs.append(img)
                tgts.append(t)
        out = {"emb": torch.stack(embs), "target": torch.stack(tgts)}
        if imgs:
            out["images"] = torch.stack(imgs)
        if self.warp is not None and rng is not None:
            out = self._augment(out, layouts, rng)
        return out

    def _augment(self, out: dict, layouts: list[dict], rng: np.random.Generator) -> dict:
        from samunet.training.cached_augmentation import random_affine, region_centres, warp_grid, warp_labels
        theta = random_affine(rng, len(layouts), region_centres(layouts), self.warp)
        out["emb"] = warp_grid(out["emb"], theta)
        out["target"] = warp_labels(out["target"], theta)
        if "images" in out:
            img = warp_grid(out["images"], theta)
            d = self.intensity(data=img.numpy(), seg=None)
            out["images"] = torch.from_numpy(np.clip(d["data"], 0, 1).astype(np.float32))
        return out


def uniform_sampling(data):
    """``data`` with its foreground oversampling switched off: rows drawn uniformly, labels never consulted
    (self-supervised pre-training)."""
    data.sampler = _RowSampler(np.zeros((len(data), 0), bool))
    return data


def neighbour_rows(rows: list) -> tuple[np.ndarray, np.ndarray]:
    """For rows ``[(view,) slice, tile]`` in slice-major, tile-minor order: the row of the previous and of the next
    slice (same view and tile), the row itself at the first and last slice."""
    r = np.asarray(rows)
    s, t = r[:, -2], r[:, -1]
    n_tiles = int(t.max()) + 1
    n = len(r)
    k = np.arange(n)
    prev = np.where(s > 0, k - n_tiles, k)
    nxt = np.where((k + n_tiles < n) & (s < np.roll(s, -n_tiles)), k + n_tiles, k)
    return prev, nxt


def _augmentation():
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                             ContrastAugmentationTransform, GammaTransform)
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
    return Compose([
        SpatialTransform(None, do_elastic_deform=False, do_rotation=True, angle_x=(-np.pi / 12, np.pi / 12),
                         do_scale=True, scale=(0.85, 1.25), border_mode_data="constant", border_cval_data=0,
                         order_data=1, border_mode_seg="constant", border_cval_seg=0, order_seg=0,
                         random_crop=False, p_rot_per_sample=0.2, p_scale_per_sample=0.2),
        GaussianNoiseTransform((0, 0.01), p_per_sample=0.1),
        BrightnessMultiplicativeTransform((0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform((0.75, 1.25), p_per_sample=0.15),
        GammaTransform((0.7, 1.5), retain_stats=True, p_per_sample=0.3),
        MirrorTransform((0, 1)),
    ])


class OnTheFlyData:
    """Slices of preprocessed cases, augmented and turned into encoder inputs for each batch."""

    def __init__(self, data_folder, identifiers: list[str], config: dict, label_values, augment: bool):
        from samunet.utils import load_json
        self.config = config
        self.label_values = list(label_values)
        self.cases = []
        index, presence = [], []
        fg_values = [v for v in sorted(label_values) if v != 0]
        for ci, ident in enumerate(identifiers):
            data = np.load(data_folder / f"{ident}.npy", mmap_mode="r")
            seg = np.load(data_folder / f"{ident}_seg.npy", mmap_mode="r")
            props = load_json(data_folder / f"{ident}.json")
            self.cases.append((data, seg))
            with_class = [set(props.get("slices_with_class", {}).get(str(v), [])) for v in fg_values]
            for s in range(data.shape[1]):
                index.append((ci, s))
                presence.append([s in w for w in with_class])
        self.index = np.array(index)
        self.sampler = _RowSampler(np.array(presence, bool).reshape(len(index), len(fg_values)))
        self.transform = _augmentation() if augment else None

    def __len__(self):
        return len(self.index)

    def batch(self, rows, rng: np.random.Generator | None = None) -> dict:
        images, targets = [], []
        for r in rows:
            ci, s = self.index[r]
            data, seg = self.cases[ci]
            img = slice_images(data, int(s), self.config)  # (n_enc, 3, Y, X)
            lab = np.asarray(seg[s])
            if self.transform is not None:
                n_enc = img.shape[0]
                d = {"data": img.reshape(1, -1, *img.shape[-2:]).astype(np.float32),
                     "seg": np.searchsorted(sorted(self.label_values), lab)[None, None].astype(np.float32)}
                d = self.transform(**d)
                img = np.clip(d["data"][0], 0, 1).reshape(n_enc, 3, *img.shape[-2:])
                lab = np.asarray(sorted(self.label_values))[np.rint(d["seg"][0, 0]).astype(np.int64)]
            layout = make_layout(lab.shape, self.config)
            if layout["mode"] == "sliding_window":  # one random tile per sample during training
                p = layout["size"]
                gen = rng if rng is not None else np.random.default_rng()
                layout["tiles"] = [[int(gen.integers(0, max(1, lab.shape[0] - p + 1))),
                                    int(gen.integers(0, max(1, lab.shape[1] - p + 1)))]]
            images.append(encoder_inputs(img, layout)[0])
            targets.append(target_inputs(lab, layout, self.label_values)[0])
        return {"images": torch.stack(images), "target": torch.stack(targets)}


class BackgroundBatches:
    """Produce ``n`` batches of ``data`` in a background thread.

    ``rank`` (a distributed run's process) draws its own batches from (seed, epoch, rank); rank 0 draws what a
    single process draws. ``pin``: batches in page-locked memory, for non-blocking copies to a GPU."""

    def __init__(self, data, n: int, batch_size: int, seed: int, epoch: int, prefetch: int = 3, rank: int = 0,
                 pin: bool = False):
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        self.n = n

        def work():
            rng = np.random.default_rng([seed, epoch] + ([rank] if rank else []))
            # batchgenerators draws from numpy's and Python's global states
            from samunet.training.cached_augmentation import seed_intensity_augmentation
            seed_intensity_augmentation((seed * 100003 + epoch + 7919 * rank) % 2**32)
            try:
                for _ in range(n):
                    rows = data.sampler.draw(rng, batch_size)
                    b = data.batch(rows, rng)
                    self.q.put({k: v.pin_memory() for k, v in b.items()} if pin else b)
            except BaseException as e:  # surface loader errors in the training loop
                self.q.put(e)

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def __iter__(self):
        for _ in range(self.n):
            b = self.q.get()
            if isinstance(b, BaseException):
                raise b
            yield b
