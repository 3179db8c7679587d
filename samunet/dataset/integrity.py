"""``--verify_dataset_integrity``: check a raw data set completely and report every problem at once."""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from samunet.dataset.dataset_json import Case, DatasetInfo, list_cases, load_dataset_json, stray_files
from samunet.dataset.case_checks import dataset_geometry_problems, image_problems, label_problems
from samunet.dataset.io import check_file_ending, read_images, read_seg
from samunet.utils import SamunetError, single_threaded_worker

logger = logging.getLogger("samunet")


def _check_case(case: Case, info: DatasetInfo) -> tuple[list[str], dict | None]:
    """The case's problems, and its geometry (file, dims, spacing) when its images could be read."""
    problems: list[str] = []
    expected = list(range(len(case.image_files)))
    if case.channel_indices != expected:
        missing = sorted(set(range(max(case.channel_indices) + 1)) - set(case.channel_indices))
        names = ", ".join(f"{case.identifier}_{i:04d}{info.file_ending}" for i in missing)
        problems.append(f"case {case.identifier}: channel file(s) missing: {names}")
        return problems, None
    try:
        data, props = read_images(case.image_files)
    except SamunetError as e:
        return [f"case {case.identifier}: {e}"], None
    geometry = {"file": str(case.image_files[0]), "dims": props["dims"], "spacing": props["spacing"]}
    if data.shape[0] != info.num_channels:
        msg = (f"case {case.identifier}: {data.shape[0]} channel(s) in "
               f"{', '.join(Path(f).name for f in case.image_files)}, but dataset.json declares "
               f"{info.num_channels} ({', '.join(info.channel_names)})")
        if all(c == 1 for c in props["channels_per_file"]) and data.shape[0] < info.num_channels:
            missing = range(len(case.image_files), info.num_channels)
            msg += "; missing " + ", ".join(f"{case.identifier}_{i:04d}{info.file_ending}" for i in missing)
        problems.append(msg)
    problems.extend(image_problems(data, props))
    if case.label_file is None or not case.label_file.is_file():
        problems.append(f"case {case.identifier}: label file {case.label_file} "
                        + ("is a folder" if case.label_file is not None and case.label_file.is_dir() else "not found"))
        return problems, geometry
    try:
        seg, seg_props = read_seg(case.label_file)
    except SamunetError as e:
        problems.append(str(e))
        return problems, geometry
    problems.extend(label_problems(data, props, seg, seg_props, case.label_file, info.label_values))
    return problems, geometry


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
    for r, _ in results:
        problems.extend(r)
    problems.extend(dataset_geometry_problems([g for _, g in results if g is not None]))
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
