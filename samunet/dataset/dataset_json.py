"""Reading and checking an nnU-Net v2 ``dataset.json`` and listing the cases of a raw data set."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from samunet.utils import SamunetError, load_json

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass
class DatasetInfo:
    folder: Path
    raw: dict
    channel_names: list[str]
    labels: dict[str, int]
    num_training: int
    file_ending: str

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels.values())

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        by_value = {v: k for k, v in self.labels.items()}
        return [by_value[v] for v in self.label_values]


def load_dataset_json(dataset_folder: str | Path) -> DatasetInfo:
    """Load and validate ``dataset.json``; every problem is reported in one error naming the file."""
    folder = Path(dataset_folder)
    path = folder / "dataset.json"
    if not path.is_file():
        raise SamunetError(f"{path}: dataset.json not found (is {folder} an nnU-Net v2 raw data set folder?)")
    raw = load_json(path)
    if not isinstance(raw, dict):
        raise SamunetError(f"{path}: expected a JSON object at the top level")
    problems: list[str] = []
    if "channel_names" not in raw and "modality" in raw:
        raw = dict(raw, channel_names=raw["modality"])  # nnU-Net v1 spelling
    for key in REQUIRED_KEYS:
        if key not in raw:
            problems.append(f"missing required key '{key}'")
    channel_names: list[str] = []
    if isinstance(raw.get("channel_names"), dict):
        try:
            keys = sorted(raw["channel_names"], key=int)
        except ValueError:
            problems.append("channel_names keys must be channel indices '0', '1', ...")
            keys = []
        if keys and [int(k) for k in keys] != list(range(len(keys))):
            problems.append(f"channel_names keys must be 0..N-1 without gaps, got {keys}")
        channel_names = [str(raw["channel_names"][k]) for k in keys]
        if not channel_names and not problems:
            problems.append("channel_names is empty")
    elif "channel_names" in raw:
        problems.append("channel_names must be an object like {\"0\": \"CT\"}")
    labels: dict[str, int] = {}
    if isinstance(raw.get("labels"), dict):
        for name, value in raw["labels"].items():
            if name == "ignore":
                problems.append("an 'ignore' label is not supported by samunet; relabel those voxels or remove "
                                "the 'ignore' entry")
                continue
            if isinstance(value, (list, tuple)):
                problems.append(f"label '{name}' is a region {value}; region-based training is not supported by "
                                "samunet, declare one integer value per class")
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"label '{name}' must be an integer, got {value!r}")
                continue
            labels[name] = value
        values = sorted(labels.values())
        if labels and 0 not in values:
            problems.append("labels must declare background as 0")
        if labels and values != list(range(len(values))):
            problems.append(f"label values must be consecutive 0..K-1, got {values}")
        if len(set(values)) != len(values):
            problems.append(f"label values must be unique, got {values}")
    elif "labels" in raw:
        problems.append("labels must be an object like {\"background\": 0, \"tumour\": 1}")
    if "regions_class_order" in raw:
        problems.append("'regions_class_order' found: region-based training is not supported by samunet")
    num_training = raw.get("numTraining")
    if "numTraining" in raw and (not isinstance(num_training, int) or num_training < 1):
        problems.append(f"numTraining must be a positive integer, got {num_training!r}")
    file_ending = raw.get("file_ending")
    if "file_ending" in raw and (not isinstance(file_ending, str) or not file_ending.startswith(".")):
        problems.append(f"file_ending must be a string starting with '.', got {file_ending!r}")
    if problems:
        raise SamunetError(f"{path}: " + "; ".join(problems))
    return DatasetInfo(folder=folder, raw=raw, channel_names=channel_names, labels=labels,
                       num_training=num_training, file_ending=file_ending)


@dataclass
class Case:
    identifier: str
    image_files: list[Path]
    label_file: Path | None = None
    channel_indices: list[int] = field(default_factory=list)


def list_cases(images_folder: str | Path, file_ending: str, labels_folder: str | Path | None = None) -> list[Case]:
    """Group ``CASE_XXXX<file_ending>`` files by case identifier, sorted by identifier."""
    images_folder = Path(images_folder)
    if not images_folder.is_dir():
        raise SamunetError(f"{images_folder}: image folder not found")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    grouped: dict[str, dict[int, Path]] = {}
    for p in sorted(images_folder.iterdir()):
        if p.name.startswith("."):
            continue
        m = pattern.match(p.name)
        if m:
            grouped.setdefault(m.group(1), {})[int(m.group(2))] = p
    cases = []
    for ident in sorted(grouped):
        idx = sorted(grouped[ident])
        label = None
        if labels_folder is not None:
            label = Path(labels_folder) / f"{ident}{file_ending}"
        cases.append(Case(ident, [grouped[ident][i] for i in idx], label, idx))
    return cases


def stray_files(images_folder: str | Path, file_ending: str) -> list[Path]:
    """Files in an image folder that do not follow the ``CASE_XXXX<file_ending>`` naming."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    return [p for p in sorted(Path(images_folder).iterdir())
            if p.is_file() and not p.name.startswith(".") and not pattern.match(p.name)]


def training_cases(info: DatasetInfo) -> list[Case]:
    return list_cases(info.folder / "imagesTr", info.file_ending, info.folder / "labelsTr")
