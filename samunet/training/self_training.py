"""Self-training: a hybrid head labels unlabelled cases for a student trained on those and the labelled ones.

    samunet_train 4 2d 0 --num_labeled_cases 5                   # the teacher: samunetTrainer_hybrid_n5
    samunet_train 4 2d 0 --num_labeled_cases 5 --self_training   # the student: samunetTrainer_hybrid_st_n5
    samunet_train 4 2d 0 --self_training --unlabeled_folder SCANS   # student of samunetTrainer_hybrid: ..._hybrid_st

The unlabelled cases come from two places. With ``--num_labeled_cases N`` the fold's other training cases are
there, only their labels are set aside (what the label-efficiency study measures); with ``--unlabeled_folder`` the
raw images of a folder (``samunet.training.unlabelled_images``); with both, both. The student reads their images
and cached embeddings with the teacher's predictions as labels (pseudo-labels, the hard argmax of the teacher's
``checkpoint_final.pth`` in the preprocessed geometry: by default without test-time augmentation, the cached
embeddings giving them for the cost of the head alone; with ``--pseudo_label_tta`` with the mirroring the teacher
was trained with, as its final validation predicts, at the price of encoding three mirrored views of every
unlabelled slice), and reference labels of the fold's cases are never opened. Every batch draws
``LABELLED_FRACTION`` of its samples from the labelled cases (and their augmented views) and the rest from the
pseudo-labelled ones (from each source in proportion to its slices), all with the hybrid head's cached-path
augmentation; the student starts afresh (noisy-student style: its augmentation is the noise the teacher's
predictions did not see), validates on the fold's validation cases like every other run and is predicted like any
other model.

Pseudo-labels are stored once per student under ``fold_K/pseudo_labels/CASE.npy`` (the fold's cases) and
``fold_K/pseudo_labels_<source>/CASE.npy`` (a folder's) (``(S, Y, X)`` int16 label values, written atomically)
with ``teacher.json`` naming the teacher's checkpoint and SHA-256; a resumed run reuses them, another teacher makes
them again (or those of the other ``--pseudo_label_tta`` setting).
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
    without self-training (and, for ``--pseudo_label_tta``, with mirroring)."""
    from samunet.paths import model_folder, trainer_name
    path = model_folder(t.dataset_name, trainer_name(t.head_name, t.num_labeled_cases), t.plans["plans_name"],
                        t.configuration) / f"fold_{t.fold}" / TEACHER_CHECKPOINT
    if not path.is_file():
        n = f" --num_labeled_cases {t.num_labeled_cases}" if t.num_labeled_cases else ""
        raise SamunetError(f"{path}: --self_training needs the teacher trained first (samunet_train "
                           f"{t.dataset_name} {t.configuration} {t.fold} --head {t.head_name}{n})")
    if t.pseudo_label_tta and not load_checkpoint(path).get("mirroring_axes"):
        raise SamunetError(f"{path}: --pseudo_label_tta mirrors the teacher's inputs, but it was trained without "
                           "mirroring (train it with augmented views, or leave the flag out)")
    return path


def check_student_options(t) -> None:
    """Refuse self-training options of trainer ``t`` that make no student (before any work): its ``student``,
    ``hybrid``, ``num_labeled_cases``, ``unlabeled_folder`` and ``pseudo_label_tta`` are set."""
    if t.unlabeled_folder is not None and not t.student:
        raise SamunetError("--unlabeled_folder gives the images a self-training student learns from; add "
                           "--self_training")
    if t.pseudo_label_tta and not t.student:
        raise SamunetError("--pseudo_label_tta says how a self-training student's labels are made; add --self_training")
    if t.student and not (t.hybrid and (t.num_labeled_cases or t.unlabeled_folder)):
        raise SamunetError("--self_training trains the hybrid head on the labelled cases and the teacher's labels "
                           "of unlabelled ones: give --head hybrid with --num_labeled_cases N (the fold's other "
                           "training cases) and/or --unlabeled_folder DIR (raw images)")
    if t.unlabeled_folder is not None:  # a wrong folder is refused before any work
        from samunet.training.unlabelled_images import unlabelled_cases
        unlabelled_cases(t.unlabeled_folder, t.plans)


def check_resumed_student(now: dict | None, then: dict | None, output: Path) -> None:
    """A student continues (``--c``) only on the pseudo-labels it started with: same teacher, same folder, same
    test-time augmentation of the teacher."""
    now, then = now or {}, then or {}
    for key, default in (("teacher_sha256", None), ("unlabeled_folder", None), ("pseudo_label_tta", False)):
        if now.get(key, default) != then.get(key, default):
            raise SamunetError(f"{output}: this run's self-training {key.replace('_', ' ')} was "
                               f"{then.get(key, default)}, now {now.get(key, default)}; train it afresh (remove the "
                               "fold or use another results folder) instead of continuing")


class PseudoLabels:
    """The teacher's labels of unlabelled cases of student trainer ``t``: the fold's (``cache``: the trainer's), or
    those of an ``--unlabeled_folder`` (its own cache, and ``source`` naming the folder)."""

    def __init__(self, t, cache=None, source: str | None = None):
        self.t = t
        self.cache = cache or t.cache
        self.folder = t.output / ("pseudo_labels" + (f"_{source}" if source else ""))
        self.teacher = teacher_checkpoint(t)
        self.tta = bool(t.pseudo_label_tta)
        self.key = {"teacher": str(self.teacher), "teacher_sha256": sha256_file(self.teacher),
                    **({"pseudo_label_tta": True} if self.tta else {})}

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
            data = np.load(self.cache.data_folder / f"{ident}.npy", mmap_mode="r")
            probs = predict_preprocessed(data, t.config, t.encoder, [head], t.num_classes, tta=self.tta,
                                         cached_embeddings=self.cache.load(ident)[0], batch_size=t.batch_size,
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
    of what it learns from: the unlabelled cases (the fold's other training cases with ``--num_labeled_cases``,
    those of ``t.unlabeled_folder``) encoded into their caches, labelled by the teacher, mixed into every batch."""
    from samunet.training.data import CachedData
    from samunet.training.distributed import shard
    sources = []  # (pseudo-labels, cases, what they are)
    if t.num_labeled_cases:
        sources.append((PseudoLabels(t), [i for i in train if i not in set(t.train_ids)],
                        "of the fold's other training cases"))  # refuses before any encoding without the teacher
    folder_record = {}
    if t.unlabeled_folder is not None:
        from samunet.training.unlabelled_images import source_name, unlabelled_cache
        teacher_checkpoint(t)  # refuses before the folder is preprocessed when the teacher is missing or unfit
        cache, ids = unlabelled_cache(t, t.unlabeled_folder)
        folder = Path(t.unlabeled_folder).resolve()
        sources.append((PseudoLabels(t, cache, source_name(folder)), ids, f"of {folder}"))
        folder_record = {"unlabeled_folder": str(folder), "unlabeled_folder_cases": len(ids)}
    sources = [s for s in sources if s[1]]
    if not sources:
        raise SamunetError(f"--self_training: no unlabelled cases (--num_labeled_cases {t.num_labeled_cases} labels "
                           f"all {len(train)} training cases of fold {t.fold}); give fewer or an --unlabeled_folder")
    parts = []
    for pseudo, ids, what in sources:
        pseudo.cache.build(shard(ids, t.dist.rank, t.dist.world_size), t.encoder, t.ram_budget_mb)
        t.dist.barrier()
        if t.dist.is_main:
            made = pseudo.build(ids)
            t.text(f"self-training: {len(ids)} pseudo-labelled case(s) {what} from the teacher {pseudo.teacher} "
                   f"({made} labelled now, the others earlier)")
        t.dist.barrier()
        parts.append(CachedData(pseudo.cache, ids, t.num_classes, canvas, warp,
                                segs={i: pseudo.load(i) for i in ids}))
    record = {**sources[0][0].key, "pseudo_labelled_cases": sum(len(ids) for _, ids, _ in sources), **folder_record,
              "labelled_fraction": LABELLED_FRACTION,
              "pseudo_labels": "argmax of the teacher's checkpoint_final.pth, "
                               + ("with mirroring test-time augmentation" if t.pseudo_label_tta
                                  else "no test-time augmentation")}
    return MixedData(t.train_data, parts, LABELLED_FRACTION), record


class MixedData:
    """Batches with ``fraction`` of their samples from ``labelled`` and the rest from the ``pseudo`` list of
    ``CachedData`` (drawn in proportion to their rows); the draws depend only on the generator, so a resumed run
    draws the same. Rows are numbered through ``labelled`` and then each pseudo part."""

    def __init__(self, labelled, pseudo: list, fraction: float = LABELLED_FRACTION):
        self.labelled, self.pseudo, self.fraction = labelled, list(pseudo), float(fraction)
        # bounds[i]: the first row of part i (0: labelled, i: pseudo part i - 1); bounds[-1]: the number of rows
        self.bounds = np.cumsum([0, len(labelled), *(len(p) for p in self.pseudo)])
        self.sampler = self

    def __len__(self):
        return int(self.bounds[-1])

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = int(round(n * self.fraction))
        sizes = np.asarray([len(p) for p in self.pseudo], float)
        counts = [n - k] if len(sizes) == 1 else rng.multinomial(n - k, sizes / sizes.sum())
        return np.concatenate([self.labelled.sampler.draw(rng, k)] +
                              [b + p.sampler.draw(rng, c) for b, p, c in zip(self.bounds[1:], self.pseudo, counts)])

    def batch(self, rows, rng: np.random.Generator | None = None) -> dict:
        rows = np.asarray(rows)
        part = np.searchsorted(self.bounds, rows, side="right") - 1
        parts = [d.batch(rows[part == i] - self.bounds[i], rng)
                 for i, d in enumerate([self.labelled, *self.pseudo]) if (part == i).any()]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
