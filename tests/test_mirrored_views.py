"""Mirrored-view embeddings kept for test-time augmentation (``samunet_train --cache_tta_views``), on a real
Hippocampus case with the real encoder and the session's trained hybrid head: encoded once, read back without the
encoder, predicting what encoding them does, and encoded again where a stored view is damaged."""
from types import SimpleNamespace

import numpy as np
import torch


class _NoEncoder(torch.nn.Module):
    """Stands in for the encoder where every embedding must come from the store."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise AssertionError("the encoder ran although the embeddings were stored")


def test_mirrored_views_are_encoded_once_and_predict_as_encoding_them_does(trained, tmp_path):
    from samunet.inference.predictor import TTA_VIEWS, predict_preprocessed
    from samunet.preprocessing.mirrored_views import MirroredViews
    t, _ = trained
    ident = t.val_ids[0]
    data = np.load(t.pp_folder / t.config["data_identifier"] / f"{ident}.npy", mmap_mode="r")
    plain = t.cache.load(ident)[0]
    rows = len(plain) // data.shape[1]
    lo = data.shape[1] // 2 - 2  # four middle slices (with hippocampus) keep the encoder's work to a few seconds
    slab = np.ascontiguousarray(data[:, lo:lo + 4])
    cache = SimpleNamespace(config=t.config, folder=tmp_path, load=lambda i: (plain[lo * rows:(lo + 4) * rows],))

    views = MirroredViews(cache).embeddings(ident, slab, t.encoder)
    assert set(views) == set(TTA_VIEWS)
    files = sorted(p.name for p in (tmp_path / "mirrored").iterdir())
    assert files == [f"{ident}_flip1.npy", f"{ident}_flip2.npy", f"{ident}_flip21.npy"]
    assert all(v.shape == views[()].shape and v.dtype == np.float16 for v in views.values())
    assert not np.allclose(views[(-1,)], views[()])  # a mirrored view is not the cached one

    encoded = predict_preprocessed(slab, t.config, t.encoder, [t.head], t.num_classes, tta=True,
                                   cached_embeddings=views[()])
    no_encoder = _NoEncoder(t.encoder.spec)
    stored = MirroredViews(cache).embeddings(ident, slab, no_encoder)  # a second validation: nothing encoded
    read = predict_preprocessed(slab, t.config, no_encoder, [t.head], t.num_classes, tta=True,
                                cached_embeddings=stored)
    assert read.shape == encoded.shape == (t.num_classes, 4, *slab.shape[2:])
    # the same prediction up to the float16 rounding of the stored embeddings
    assert np.abs(read - encoded).max() < 0.02
    assert (read.argmax(0) == encoded.argmax(0)).mean() > 0.999

    # a view cut short (a run killed while writing it elsewhere, a full disk) is encoded again, not read
    expected = np.array(views[(-2,)])
    del views, stored  # their memory maps of the file damaged below
    damaged = tmp_path / "mirrored" / f"{ident}_flip2.npy"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    again = MirroredViews(cache).embeddings(ident, slab, t.encoder)
    assert np.array_equal(np.asarray(again[(-2,)]), expected)
