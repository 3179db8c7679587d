"""Final validation of a trained fold: its validation cases predicted in their original geometry, then evaluated.

    summary = final_validation(trainer, "checkpoint_final.pth", save_probabilities=False)

It runs the same ``predict_preprocessed`` as ``samunet_predict`` (mirroring test-time augmentation only for models
trained with mirroring; heads read the cached embeddings of the un-flipped view instead of re-encoding them, and
those of the mirrored views too with ``cache_tta_views``, ``samunet.preprocessing.mirrored_views``) and writes
``fold_K/validation/CASE<ending>`` and ``summary.json``.

Resumable per case: after a case's files are written, ``validation/.done/CASE.json`` records what produced them (the
checkpoint's SHA-256, the test-time augmentation, whether probabilities were saved). A rerun after an interruption
(``samunet_train ... --c`` or ``--val``) predicts only the cases without a matching record; another checkpoint or
other settings predict every case again. Under torchrun each process validates its share of the cases.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from samunet.models.checkpoints import sha256_file
from samunet.models.run_checkpoint import check_compatible, load_checkpoint
from samunet.training.distributed import shard
from samunet.utils import json_matches, load_json, save_json


def final_validation(t, checkpoint: str = "checkpoint_final.pth", save_probabilities: bool = False,
                     cache_tta_views: bool = False) -> dict:
    """Predict and evaluate the validation cases of trainer ``t``'s fold with ``checkpoint``; with
    ``cache_tta_views``, the mirrored views' embeddings are read from (or encoded into) ``MirroredViews``."""
    from samunet.dataset.io import write_seg
    from samunet.evaluation.evaluate import evaluate_folder
    from samunet.inference.predictor import predict_preprocessed, probabilities_to_segmentation
    from samunet.preprocessing.mirrored_views import MirroredViews
    if t.head is None:
        t.initialize(training=False)
    path = t.output / checkpoint
    state = load_checkpoint(path)
    check_compatible(state, path, t._expected())
    t.head.load_state_dict(state["head_state"])
    t.head.eval()
    # mirroring test-time augmentation, as samunet_predict (and nnU-Net's validation) applies it: only for models
    # whose training mirrored their inputs
    tta = bool(state.get("mirroring_axes"))
    data_dir = t.pp_folder / t.config["data_identifier"]
    val_dir = t.output / "validation"
    done_dir = val_dir / ".done"
    done_dir.mkdir(parents=True, exist_ok=True)
    ending = t.plans["file_ending"]
    key = {"checkpoint": checkpoint, "checkpoint_sha256": sha256_file(path), "mirroring_tta": tta,
           "probabilities": bool(save_probabilities)}
    mine = shard(t.val_ids, t.dist.rank, t.dist.world_size)
    todo = [i for i in mine if not (json_matches(done_dir / f"{i}.json", key) and (val_dir / f"{i}{ending}").is_file()
                                    and (not save_probabilities or (val_dir / f"{i}.npz").is_file()))]
    if len(todo) < len(mine):
        t.text(f"final validation: {len(mine) - len(todo)} of {len(mine)} case(s) already predicted with this "
               f"checkpoint; predicting the other {len(todo)}")
    for ident in tqdm(todo, desc="final validation", disable=not t.dist.is_main):
        (done_dir / f"{ident}.json").unlink(missing_ok=True)
        data = np.load(data_dir / f"{ident}.npy", mmap_mode="r")
        props = load_json(data_dir / f"{ident}.json")
        emb = t.cache.load(ident)[0] if t.cache is not None and t.use_cache and t.cache.is_done(ident) else None
        if emb is not None and tta and cache_tta_views:
            emb = MirroredViews(t.cache).embeddings(ident, data, t.encoder)  # {view: embeddings}, stored for reuse
        probs_pp = predict_preprocessed(data, t.config, t.encoder, [t.head], t.num_classes, tta=tta,
                                        cached_embeddings=emb, batch_size=t.batch_size, device=t.device)
        seg, probs = probabilities_to_segmentation(probs_pp, props, t.label_values)
        write_seg(seg, props["original"], val_dir / f"{ident}{ending}")
        if save_probabilities:
            np.savez_compressed(val_dir / f"{ident}.npz", probabilities=probs.astype(np.float16))
        save_json(key, done_dir / f"{ident}.json")
    t.dist.barrier()  # every process has written its share of the validation cases
    if not t.dist.is_main:
        return t.dist.broadcast_object(None)
    summary = evaluate_folder(t.pp_folder / "gt_segmentations", val_dir,
                              labels=[v for v in t.label_values if v != 0], file_ending=ending,
                              output_file=val_dir / "summary.json", cases=t.val_ids)
    t.text(f"final validation ({checkpoint}, {len(t.val_ids)} cases"
           f"{', mirroring test-time augmentation' if tta else ''}): mean foreground Dice "
           f"{summary['foreground_mean']['Dice']:.4f}, per class "
           + ", ".join(f"{k}: {v['Dice']:.4f}" for k, v in summary["mean"].items()))
    return t.dist.broadcast_object(summary)
