"""Self-training: a hybrid head trained on few labelled cases labels the fold's other training cases for a student.

    samunet_train 4 2d 0 --num_labeled_cases 5                   # the teacher: samunetTrainer_hybrid_n5
    samunet_train 4 2d 0 --num_labeled_cases 5 --self_training   # the student: samunetTrainer_hybrid_st_n5

With ``--num_labeled_cases N`` the fold's other training cases are there, only their labels are set aside. The
student reads their images and cached embeddings with the teacher's predictions as labels (pseudo-labels, the hard
argmax of the teacher's ``checkpoint_final.pth`` in the preprocessed geometry, without test-time augmentation: the
cached embeddings give them for the cost of the head alone), and their reference labels are never opened. Every
batch draws ``LABELLED_FRACTION`` of its samples from the labelled cases (and their augmented views) and the rest
from the pseudo-labelled ones, both with the hybrid head's cached-path augmentation; the student starts afresh
(noisy-student style: its augmentation is the noise the teacher's predictions did not see), validates on the
fold's validation cases like every other run and is predicted like any other model.

Pseudo-labels are stored once per student under ``fold_K/pseudo_labels/CASE.npy`` (``(S, Y, X)`` int16 label
values, written atomically) with ``teacher.json`` naming the teacher's checkpoint and SHA-256; a resumed run reuses
them, another teacher makes them again.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from samunet.models.checkpoints import sha256_file
from samunet.models.run_checkpoint import check_compatible, load_checkpoint
from samunet.utils import SamunetError, atomic_save_npy, json_matches, save_json

LABELLED_FRACTION = 0.5  # of each batch, from the labelled cases; the rest from the pseudo-labelled ones
TEACHER_CHECKPOINT = "checkpoint_final.pth"


def teacher_checkpoint(t) -> Path:
    """The teacher of student trainer ``t``: the same head, configuration, fold and labelled cases, trained
    without self-training."""
    from samunet.paths import model_folder, trainer_name
    path = model_folder(t.dataset_name, trainer_name(t.head_name, t.num_labeled_cases), t.plans["plans_name"],
                        t.configuration) / f"fold_{t.fold}" / TEACHER_CHECKPOINT
    if not path.is_file():
        n = f" --num_labeled_cases {t.num_labeled_cases}" if t.num_labeled_cases else ""
        raise SamunetError(f"{path}: --self_training needs the teacher trained first (samunet_train "
                           f"{t.dataset_name} {t.configuration} {t.fold} --head {t.head_name}{n})")
    return path


class PseudoLabels:
    """The teacher's labels of the unlabelled training cases of student trainer ``t``."""

    def __init__(self, t):
        self.t = t
        self.folder = t.output / "pseudo_labels"
        self.teacher = teacher_checkpoint(t)
        self.key = {"teacher": str(self.teacher), "teacher_sha256": sha256_file(self.teacher)}

    def file(self, ident: str):
        return self.folder / f"{ident}.npy"

    def build(self, identifiers: list[str]) -> int:
        """Label every listed case that has no pseudo-label from this teacher yet; returns how many were made."""
        key_file = self.folder / "teacher.json"
        if not json_matches(key_file, self.key) and self.folder.is_dir():  # another teacher (retrained): its labels go
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_json(self.key, key_file)
        todo = [i for i in identifiers if not self.file(i).is_file()]
        if not todo:
            return 0
        head = self._teacher_head()
        from samunet.inference.predictor import predict_preprocessed
        t = self.t
        values = np.asarray(sorted(t.label_values))
        for ident in todo:
            data = np.load(t.cache.data_folder / f"{ident}.npy", mmap_mode="r")
            probs = predict_preprocessed(data, t.config, t.encoder, [head], t.num_classes, tta=False,
                                         cached_embeddings=t.cache.load(ident)[0], batch_size=t.batch_size,
                                         device=t.device)
            atomic_save_npy(self.file(ident), values[probs.argmax(0)].astype(np.int16))
        return len(todo)

    def _teacher_head(self):
        from samunet.models.for_plans import build_model
        t = self.t
        state = load_checkpoint(self.teacher)
        check_compatible(state, self.teacher, t._expected())
        head = build_model(t.head_name, t.encoder, t.num_classes, t.n_enc, t.context,
                           hybrid_architecture=state["hybrid_architecture"])
        head.load_state_dict(state["head_state"])
        return head.to(t.device).eval()

    def load(self, ident: str) -> np.ndarray:
        return np.load(self.file(ident), mmap_mode="r")


def student_data(t, train: list[str], canvas: int, warp) -> tuple["MixedData", dict]:
    """The training data of student trainer ``t`` (its labelled data ``t.train_data`` already made) and the record
    of what it learns from: the fold's other training cases ``train`` encoded into the cache, labelled by the
    teacher, mixed into every batch."""
    from samunet.training.data import CachedData
    from samunet.training.distributed import shard
    pseudo = PseudoLabels(t)  # refuses before any encoding when the teacher is missing
    others = [i for i in train if i not in set(t.train_ids)]
    t.cache.build(shard(others, t.dist.rank, t.dist.world_size), t.encoder, t.ram_budget_mb)
    t.dist.barrier()
    if t.dist.is_main:
        made = pseudo.build(others)
        t.text(f"self-training: {len(others)} pseudo-labelled case(s) from the teacher {pseudo.teacher} "
               f"({made} labelled now, the others earlier)")
    t.dist.barrier()
    data = CachedData(t.cache, others, t.num_classes, canvas, warp, segs={i: pseudo.load(i) for i in others})
    record = {**pseudo.key, "pseudo_labelled_cases": len(others), "labelled_fraction": LABELLED_FRACTION,
              "pseudo_labels": "argmax of the teacher's checkpoint_final.pth, no test-time augmentation"}
    return MixedData(t.train_data, data, LABELLED_FRACTION), record


class MixedData:
    """Batches with ``fraction`` of their samples from ``labelled`` and the rest from ``pseudo`` (two
    ``CachedData``); the draws of each part depend only on the generator, so a resumed run draws the same."""

    def __init__(self, labelled, pseudo, fraction: float = LABELLED_FRACTION):
        self.labelled, self.pseudo, self.fraction = labelled, pseudo, float(fraction)
        self.sampler = self

    def __len__(self):
        return len(self.labelled) + len(self.pseudo)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = int(round(n * self.fraction))
        return np.concatenate([self.labelled.sampler.draw(rng, k),
                               len(self.labelled) + self.pseudo.sampler.draw(rng, n - k)])

    def batch(self, rows, rng: np.random.Generator | None = None) -> dict:
        rows = np.asarray(rows)
        mine = rows < len(self.labelled)
        split = ((self.labelled, rows[mine]), (self.pseudo, rows[~mine] - len(self.labelled)))
        parts = [d.batch(r, rng) for d, r in split if len(r)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
