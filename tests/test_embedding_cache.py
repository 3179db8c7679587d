"""The frozen-encoder embedding cache: keyed so that a stale cache is never used, and resumable."""
import json

import numpy as np
import pytest
import torch

from conftest import HIPPO, copy_dataset, hippo_cases
from samunet.models.encoders import build_encoder, encoder_identity
from samunet.plan_and_preprocess import plan_and_preprocess
from samunet.preprocessing.embedding_cache import EmbeddingCache, cache_key


@pytest.fixture
def planned(samunet_dirs):
    cases = hippo_cases(3)
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], cases)
    plans = plan_and_preprocess(4, num_processes=1, encoder="test_tiny", input_size=64, configurations=["2d"])
    return samunet_dirs["samunet_preprocessed"] / "Dataset004_Hippocampus", plans, cases


def test_cache_key_changes_with_encoder_weights_size_and_preprocessing(planned):
    folder, plans, _ = planned
    cfg = plans["configurations"]["2d"]
    tiny = encoder_identity(build_encoder("test_tiny", input_size=64))
    base = cache_key(tiny, cfg)
    assert cache_key(dict(tiny), dict(cfg)) == base  # deterministic
    assert cache_key(dict(tiny, weights_sha256="0" * 64), cfg) != base
    assert cache_key(dict(tiny, name="lite_medsam"), cfg) != base
    assert cache_key(tiny, dict(cfg, encoder_input_size=128)) != base
    assert cache_key(tiny, dict(cfg, preprocessing_identity="different")) != base
    assert cache_key(tiny, dict(cfg, slice_context=3)) != base
    lite = encoder_identity(build_encoder("lite_medsam", input_size=64))
    assert cache_key(lite, cfg) != base
    assert EmbeddingCache(folder, "2d", cfg, lite, [0, 1, 2]).folder != EmbeddingCache(folder, "2d", cfg, tiny,
                                                                                        [0, 1, 2]).folder


class _Interrupting(torch.nn.Module):
    """Wraps an encoder and fails after a number of calls, like a run killed part-way."""

    def __init__(self, encoder, calls):
        super().__init__()
        self.inner, self.calls, self.spec = encoder, calls, encoder.spec

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(x)


def test_interrupted_cache_build_resumes_and_matches_the_encoder(planned):
    folder, plans, cases = planned
    cfg = plans["configurations"]["2d"]
    enc = build_encoder("test_tiny", input_size=64)
    cache = EmbeddingCache(folder, "2d", cfg, encoder_identity(enc), plans["label_values"])
    # batches of 8 images: a Hippocampus case (~35 slices) takes several calls, so the run dies in case 2
    with pytest.raises(KeyboardInterrupt):
        cache.build(cases, _Interrupting(enc, 6), ram_budget_mb=8 * enc.spec.mb_per_image(64))
    assert cache.missing(cases) == cases[1:]
    assert not list(cache.folder.glob(f"{cases[1]}*"))  # nothing half-written under a final name
    done_mtime = (cache.folder / f"{cases[0]}_emb.npy").stat().st_mtime_ns
    assert cache.build(cases, enc) > 0
    assert cache.missing(cases) == []
    assert (cache.folder / f"{cases[0]}_emb.npy").stat().st_mtime_ns == done_mtime
    emb, tgt, index = cache.load(cases[1])
    data = np.load(folder / cfg["data_identifier"] / f"{cases[1]}.npy")
    assert emb.dtype == np.float16 and emb.shape[0] == data.shape[1] == tgt.shape[0]
    assert emb.shape[1:] == enc.spec.embedding_shape(64)
    from samunet.preprocessing.encoder_inputs import encoder_inputs, slice_images
    s = data.shape[1] // 2
    x = encoder_inputs(slice_images(data, s, cfg), index["layout"])[0]
    with torch.inference_mode():
        direct = enc(x).numpy()[0]
    assert np.allclose(emb[s].astype(np.float32), direct, rtol=1e-2, atol=1e-2 * np.abs(direct).max())
    assert json.loads((cache.folder / "cache_identity.json").read_text())["key"] == cache.key
