"""Where samunet keeps raw data, preprocessed data and results.

Like nnU-Net v2, three folders are read from environment variables:

- ``samunet_raw``: raw data sets, ``DatasetXXX_Name/`` with ``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``
- ``samunet_preprocessed``: fingerprints, plans and preprocessed cases
- ``samunet_results``: trained models

When a variable is unset, the default is a folder of that name in the current working directory
(``./samunet_raw`` and so on); this is announced once per process on the ``samunet`` logger.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from samunet.utils import SamunetError

logger = logging.getLogger("samunet")

FOLDER_VARIABLES = ("samunet_raw", "samunet_preprocessed", "samunet_results")
_announced: set[str] = set()


def _folder(variable: str) -> Path:
    value = os.environ.get(variable)
    if value:
        return Path(value)
    default = Path.cwd() / variable
    if variable not in _announced:
        _announced.add(variable)
        logger.warning("environment variable %s is not set; using the default %s", variable, default)
    return default


def raw_folder() -> Path:
    return _folder("samunet_raw")


def preprocessed_folder() -> Path:
    return _folder("samunet_preprocessed")


def results_folder() -> Path:
    return _folder("samunet_results")


# a plain folder name: no separators and no '..', so a data set name can never point outside the samunet folders
_NAME_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_.-]*)$")


def dataset_id_from_name(name: str) -> int:
    m = _NAME_RE.match(name)
    if not m or ".." in name:
        raise SamunetError(f"'{name}': not a plain data set name DatasetXXX_Name (XXX three digits; the name only "
                           "letters, digits, '_', '-' and '.', no folder separators or '..')")
    return int(m.group(1))


def _candidates(folder: Path, dataset_id: int) -> list[str]:
    if not folder.is_dir():
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix))


def resolve_dataset_name(dataset: str | int) -> str:
    """Turn ``4``, ``"4"``, ``"004"`` or ``"Dataset004_Hippocampus"`` into the full name.

    The name is looked up in the raw, preprocessed and results folders, in that order.
    """
    text = str(dataset).strip()
    if text.startswith("Dataset"):
        dataset_id_from_name(text)  # validates the form
        return text
    if not text.isdigit():
        raise SamunetError(f"data set '{dataset}' is neither an id (e.g. 4) nor a name (e.g. Dataset004_Hippocampus)")
    dataset_id = int(text)
    found: list[str] = []
    for folder in (raw_folder(), preprocessed_folder(), results_folder()):
        for name in _candidates(folder, dataset_id):
            if name not in found:
                found.append(name)
    if not found:
        raise SamunetError(
            f"no data set with id {dataset_id} (a folder Dataset{dataset_id:03d}_*) in samunet_raw={raw_folder()}, "
            f"samunet_preprocessed={preprocessed_folder()} or samunet_results={results_folder()}; "
            "set these environment variables or pass the full data set name")
    if len(found) > 1:
        raise SamunetError(f"data set id {dataset_id} is ambiguous: {', '.join(found)}; pass the full name")
    return found[0]


def trainer_name(head: str, num_labeled_cases: int | None = None, pretrained: bool = False,
                 self_training: bool = False) -> str:
    """``samunetTrainer_<head>[_ssl|_st][_n<N>]``; ``_ssl``: the U-Net fine-tuned from ``samunet_pretrain`` weights;
    ``_st``: a student of self-training (``samunet.training.self_training``)."""
    return f"samunetTrainer_{head}" + ("_ssl" if pretrained else "") + ("_st" if self_training else "") + \
        (f"_n{num_labeled_cases}" if num_labeled_cases else "")


def model_folder(dataset_name: str, trainer: str, plans_name: str, config: str) -> Path:
    return results_folder() / dataset_name / f"{trainer}__{plans_name}__{config}"
