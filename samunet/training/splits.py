"""Cross-validation splits (``splits_final.json``) and labelled-case subsets."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from samunet.utils import SamunetError, load_json, save_json

logger = logging.getLogger("samunet")

NUM_FOLDS = 5
SPLIT_SEED = 12345


def make_splits(identifiers: list[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    """Seeded k-fold split over cases (a 3D case's slices always stay together)."""
    ids = sorted(identifiers)
    if len(ids) < num_folds:
        raise SamunetError(f"{len(ids)} case(s) cannot be split into {num_folds} folds; train with fold 'all' "
                           "or provide splits_final.json")
    perm = np.random.RandomState(seed).permutation(len(ids))
    parts = np.array_split(perm, num_folds)
    splits = []
    for k in range(num_folds):
        val = sorted(ids[i] for i in parts[k])
        splits.append({"train": [i for i in ids if i not in set(val)], "val": val})
    return splits


def get_split(preprocessed_dataset: Path, identifiers: list[str], fold) -> tuple[list[str], list[str]]:
    """Training and validation cases of ``fold`` (an int or ``"all"``).

    ``splits_final.json`` in the preprocessed data set folder is used when present (so a user-provided split is
    respected) and created otherwise.
    """
    if str(fold) == "all":
        ids = sorted(identifiers)
        return ids, ids
    path = Path(preprocessed_dataset) / "splits_final.json"
    if path.is_file():
        splits = load_json(path)
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s)
                                                   for s in splits):
            raise SamunetError(f"{path}: expected a list of {{\"train\": [...], \"val\": [...]}} entries")
    else:
        splits = make_splits(identifiers)
        save_json(splits, path)
        logger.info("created a %d-fold split in %s", len(splits), path)
    fold = int(fold)
    if not 0 <= fold < len(splits):
        raise SamunetError(f"fold {fold} does not exist in {path} ({len(splits)} folds)")
    known = set(identifiers)
    unknown = sorted((set(splits[fold]["train"]) | set(splits[fold]["val"])) - known)
    if unknown:
        raise SamunetError(f"{path}: fold {fold} names case(s) that are not in the data set: {', '.join(unknown[:5])}")
    return sorted(splits[fold]["train"]), sorted(splits[fold]["val"])


def labeled_subset(train: list[str], n: int | None, fold, seed: int = SPLIT_SEED) -> list[str]:
    """A seeded subset of ``n`` training cases; subsets for growing ``n`` are nested (1 in 2 in 5 ...)."""
    if n is None or n >= len(train):
        return list(train)
    if n < 1:
        raise SamunetError(f"--num_labeled_cases must be at least 1, got {n}")
    fold_seed = seed + (0 if str(fold) == "all" else int(fold) + 1)
    order = np.random.RandomState(fold_seed).permutation(len(train))
    return sorted(train[i] for i in order[:n])
