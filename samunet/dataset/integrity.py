"""``--verify_dataset_integrity``: check a raw data set completely and report every problem at once."""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from samunet.dataset.dataset_json import Case, DatasetInfo, list_cases, load_dataset_json, stray_files
from samunet.dataset.io import check_file_ending, geometry_mismatch, read_images, read_seg
from samunet.utils import SamunetError, single_threaded_worker

logger = logging.getLogger("samunet")


def _check_case(case: Case, info: DatasetInfo) -> list[str]:
    problems: list[str] = []
    expected = list(range(len(case.image_files)))
    if case.channel_indices != expected:
        missing = sorted(set(range(max(case.channel_indices) + 1)) - set(case.channel_indices))
        names = ", ".join(f"{case.identifier}_{i:04d}{info.file_ending}" for i in missing)
        problems.append(f"case {case.identifier}: channel file(s) missing: {names}")
        return problems
    try:
        data, props = read_images(case.image_files)
    except SamunetError as e:
        return [f"case {case.identifier}: {e}"]
    if data.shape[0] != info.num_channels:
        msg = (f"case {case.identifier}: {data.shape[0]} channel(s) in "
               f"{', '.join(Path(f).name for f in case.image_files)}, but dataset.json declares "
               f"{info.num_channels} ({', '.join(info.channel_names)})")
        if all(c == 1 for c in props["channels_per_file"]) and data.shape[0] < info.num_channels:
            missing = range(len(case.image_files), info.num_channels)
            msg += "; missing " + ", ".join(f"{case.identifier}_{i:04d}{info.file_ending}" for i in missing)
        problems.append(msg)
    bad = ~np.isfinite(data)
    if bad.any():
        per_channel = bad.reshape(data.shape[0], -1).sum(1)
        for c, n in enumerate(per_channel):
            if n:
                problems.append(f"{props['files'][min(c, len(props['files']) - 1)]}: {int(n)} NaN/Inf voxel(s) "
                                f"in channel {c}")
    if case.label_file is None or not case.label_file.is_file():
        problems.append(f"case {case.identifier}: label file {case.label_file} not found")
        return problems
    try:
        seg, seg_props = read_seg(case.label_file)
    except SamunetError as e:
        problems.append(str(e))
        return problems
    mismatch = geometry_mismatch(props, seg_props)
    if mismatch:
        problems.append(f"{case.label_file}: geometry differs from image {Path(props['files'][0]).name} ({mismatch})")
    found = set(np.unique(seg).tolist())
    undeclared = sorted(found - set(info.label_values))
    if undeclared:
        problems.append(f"{case.label_file}: label value(s) {undeclared} not declared in dataset.json "
                        f"(declared: {info.label_values})")
    return problems


def verify_dataset_integrity(dataset_folder: str | Path, num_processes: int = 1) -> None:
    """Raise :class:`SamunetError` listing every problem found, or return quietly if the data set is sound."""
    folder = Path(dataset_folder)
    info = load_dataset_json(folder)
    check_file_ending(info.file_ending)
    problems: list[str] = []
    images_tr, labels_tr = folder / "imagesTr", folder / "labelsTr"
    for sub in (images_tr, labels_tr):
        if not sub.is_dir():
            problems.append(f"{sub}: folder not found")
    if problems:
        raise SamunetError(f"data set {folder.name} failed the integrity check:\n  - " + "\n  - ".join(problems))
    for p in stray_files(images_tr, info.file_ending):
        problems.append(f"{p}: does not match CASE_XXXX{info.file_ending} (wrong file ending or name)")
    cases = list_cases(images_tr, info.file_ending, labels_tr)
    if len(cases) != info.num_training:
        problems.append(f"dataset.json: numTraining is {info.num_training} but imagesTr holds {len(cases)} case(s)")
    idents = {c.identifier for c in cases}
    for p in sorted(labels_tr.iterdir()):
        if p.name.endswith(info.file_ending) and p.name[: -len(info.file_ending)] not in idents:
            problems.append(f"{p}: label file without images in imagesTr")
        elif not p.name.startswith(".") and not p.name.endswith(info.file_ending):
            problems.append(f"{p}: does not end with {info.file_ending}")
    if num_processes > 1 and len(cases) > 1:
        with ProcessPoolExecutor(num_processes, initializer=single_threaded_worker) as ex:
            results = list(ex.map(_check_case, cases, [info] * len(cases), chunksize=4))
    else:
        results = [_check_case(c, info) for c in cases]
    for r in results:
        problems.extend(r)
    images_ts = folder / "imagesTs"
    if images_ts.is_dir():
        for p in stray_files(images_ts, info.file_ending):
            problems.append(f"{p}: does not match CASE_XXXX{info.file_ending} (wrong file ending or name)")
        n_files = {len(c.image_files) for c in cases}
        for c in list_cases(images_ts, info.file_ending):
            if len(c.image_files) not in n_files or c.channel_indices != list(range(len(c.image_files))):
                problems.append(f"imagesTs case {c.identifier}: channel files {c.channel_indices} do not match "
                                f"the training cases")
    if problems:
        raise SamunetError(f"data set {folder.name} failed the integrity check ({len(problems)} problem(s)):\n  - "
                           + "\n  - ".join(problems))
    logger.info("data set %s passed the integrity check (%d cases)", folder.name, len(cases))
