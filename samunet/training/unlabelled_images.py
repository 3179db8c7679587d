"""Unlabelled images for self-training: scans nobody has labelled, given to the student beside the labelled cases.

    samunet_train 4 2d 0                                                   # the teacher: samunetTrainer_hybrid
    samunet_train 4 2d 0 --self_training --unlabeled_folder SCANS          # the student: samunetTrainer_hybrid_st

``SCANS`` holds raw images named as in ``imagesTr`` (``CASE_XXXX<file ending>``, one file per channel; a data
set's ``imagesTs`` qualifies). They are preprocessed with the plans (as ``samunet_predict`` does) and encoded into
an embedding cache of their own under ``samunet_preprocessed/DatasetXXX/unlabeled/<folder name>_<hash of its
path>/``, so the data set's preprocessed cases, splits and cache are never touched, and a case of ``SCANS`` may
share its name with a training case. Both steps resume like the data set's own (finished cases are skipped). The
teacher labels them (``samunet.training.self_training``) and stores those labels per folder, so a student of
another folder never reads them.
"""
from __future__ import annotations

from pathlib import Path

from samunet.dataset.dataset_json import list_cases
from samunet.planning.plans import case_limits
from samunet.preprocessing.embedding_cache import EmbeddingCache
from samunet.utils import SamunetError, stable_hash


def source_name(folder: Path) -> str:
    """``<folder name>_<hash of its absolute path>``: where the folder's preprocessed cases and labels live."""
    folder = Path(folder).resolve()
    return f"{folder.name}_{stable_hash(str(folder), 8)}"


def unlabelled_cases(folder, plans: dict) -> list:
    """The cases of ``folder`` (``samunet.dataset.dataset_json.Case``), refusing a folder that is missing, holds no
    image named for the plans' file ending, or a case whose channel files are not those of the plans."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SamunetError(f"{folder}: --unlabeled_folder not found")
    ending = plans["file_ending"]
    cases = list_cases(folder, ending)
    if not cases:
        raise SamunetError(f"{folder}: no images named CASE_XXXX{ending} (--unlabeled_folder takes raw images "
                           "named as in imagesTr)")
    n_ch = len(plans["channel_names"])
    for case in cases:
        if case.channel_indices != list(range(n_ch)):
            raise SamunetError(f"{case.image_files[0]}: case {case.identifier} has channel files "
                               f"{case.channel_indices}; the plans expect {n_ch} (0..{n_ch - 1})")
    return cases


def unlabelled_cache(t, folder) -> tuple[EmbeddingCache, list[str]]:
    """The images of ``folder`` for student trainer ``t``: preprocessed (if not yet), their embedding cache (not
    yet built: ``t`` builds it with its encoder) and their case identifiers."""
    from samunet.preprocessing.preprocessor import preprocess_cases
    cases = unlabelled_cases(folder, t.plans)
    root = t.pp_folder / "unlabeled" / source_name(folder)
    dims, memory_gb = case_limits(t.pp_folder, t.plans)
    if t.dist.is_main:
        preprocess_cases(cases, t.config, t.label_values, root / t.config["data_identifier"], num_processes=1,
                         desc=f"preprocess {Path(folder).name}", dims=dims, memory_gb=memory_gb)
    t.dist.barrier()
    cache = EmbeddingCache(root, t.configuration, t.config, t._identity(), t.label_values)
    return cache, [c.identifier for c in cases]
