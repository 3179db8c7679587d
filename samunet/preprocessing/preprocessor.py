"""Preprocess cases as the plans say, store them, and invert every step for predictions.

Per case: read, crop to the non-zero box, normalise each channel into [0, 1], move the slice axis first, resample
in-plane to the target spacing. Stored in ``samunet_preprocessed/DatasetXXX/<data_identifier>/``:

- ``CASE.npy``: ``(C, S, Y, X)`` float32 image data
- ``CASE_seg.npy``: ``(S, Y, X)`` int16 label map (training cases)
- ``CASE.json``: everything needed to map a prediction back to the original file's geometry

Files are written under temporary names and renamed; ``CASE.json`` comes last and marks the case as finished, so
an interrupted run leaves no half-written case and the next run skips the finished ones.
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from samunet.dataset.case_checks import image_problems, label_problems
from samunet.dataset.io import read_images, read_seg
from samunet.preprocessing.cropping import crop_to_nonzero, paste_into
from samunet.preprocessing.normalization import normalise
from samunet.preprocessing.resampling import new_inplane_shape, resample_data, resample_probabilities, resample_seg
from samunet.preprocessing.size_checks import resampling_problem
from samunet.utils import (SamunetError, atomic_save_npy, load_json, save_json, single_threaded_worker,
                           sweep_stale_temps)

logger = logging.getLogger("samunet")


def preprocess_case(image_files, seg_file, config: dict, label_values, dims: int | None = None,
                    memory_gb: float | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Preprocess one case. ``dims`` (2 or 3, the data set's) and ``memory_gb`` (the plans' budget) add checks
    that refuse a case of the wrong dimensionality or one whose resampling would not fit, before resampling."""
    data, props = read_images(image_files)
    seg = seg_props = None
    if seg_file is not None:
        seg, seg_props = read_seg(seg_file)
    return preprocess_array(data, props, config, label_values, dims, memory_gb, seg, seg_props, seg_file)


def preprocess_array(data: np.ndarray, props: dict, config: dict, label_values, dims: int | None = None,
                     memory_gb: float | None = None, seg: np.ndarray | None = None, seg_props: dict | None = None,
                     seg_file=None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """``preprocess_case`` on arrays already in memory: ``data`` ``(C, Z, Y, X)`` with ``props`` as
    ``read_images`` gives them (``files``, ``spacing``, ``dims``, ``shape``, ``origin``, ``direction``, ``io``)."""
    problems = image_problems(data, props, dims)
    if seg is not None:
        problems += label_problems(data, props, seg, seg_props, seg_file, label_values)
    if problems:
        raise SamunetError("; ".join(problems))
    if data.shape[0] != len(config["normalization"]):
        raise SamunetError(f"{props['files'][0]}: {data.shape[0]} channel(s), but the plans expect "
                           f"{len(config['normalization'])}")
    shape_before = list(data.shape[1:])
    data, seg, bbox = crop_to_nonzero(data, seg)
    shape_after_crop = list(data.shape[1:])
    data, used = normalise(data, config["normalization"])
    transpose = config["transpose_forward"]
    data = data.transpose([0] + [t + 1 for t in transpose])
    spacing_t = [props["spacing"][t] for t in transpose]
    problem = resampling_problem(props["files"][0], data.shape[1:], spacing_t, config["target_spacing_inplane"],
                                 data.shape[0], memory_gb)
    if problem:
        raise SamunetError(problem)
    new_yx = new_inplane_shape(data.shape[2:], spacing_t[1:], config["target_spacing_inplane"])
    data = np.clip(resample_data(data, new_yx), 0.0, 1.0)
    if seg is not None:
        seg = resample_seg(np.ascontiguousarray(seg.transpose(transpose)), new_yx, label_values)
    properties = {
        "original": props,
        "shape_before_cropping": shape_before,
        "bbox_used_for_cropping": bbox,
        "shape_after_cropping": shape_after_crop,
        "transpose_forward": list(transpose),
        "spacing_transposed": spacing_t,
        "shape_after_resampling": list(data.shape[1:]),
        "normalization_used": used,
        "preprocessing_identity": config["preprocessing_identity"],
    }
    if seg is not None:
        properties["slices_with_class"] = {
            str(v): np.flatnonzero((seg == v).reshape(seg.shape[0], -1).any(1)).tolist()
            for v in label_values if v != 0}
    return np.ascontiguousarray(data, dtype=np.float32), seg, properties


def revert_probabilities(probs: np.ndarray, properties: dict) -> np.ndarray:
    """``(K, S, Y', X')`` class probabilities in preprocessed space -> ``(K, Z, Y, X)`` in the original array."""
    transpose = properties["transpose_forward"]
    cropped_t = [properties["shape_after_cropping"][t] for t in transpose]
    probs = resample_probabilities(probs.astype(np.float32, copy=False), cropped_t[1:])
    backward = list(np.argsort(transpose))
    probs = probs.transpose([0] + [int(b) + 1 for b in backward])
    fill = np.zeros(probs.shape[0], np.float32)
    fill[0] = 1.0  # outside the non-zero box is background
    return paste_into(properties["shape_before_cropping"], probs, properties["bbox_used_for_cropping"], fill)


def revert_seg(seg: np.ndarray, properties: dict, label_values) -> np.ndarray:
    """A label map in preprocessed space -> the original array's shape (same path as predictions take)."""
    label_values = np.asarray(sorted(label_values))
    onehot = (seg[None] == label_values.reshape(-1, 1, 1, 1)).astype(np.float32)
    return label_values[revert_probabilities(onehot, properties).argmax(0)].astype(np.int16)


def case_is_done(out_dir: Path, identifier: str, identity: str, with_seg: bool) -> bool:
    js = out_dir / f"{identifier}.json"
    if not js.is_file() or not (out_dir / f"{identifier}.npy").is_file():
        return False
    if with_seg and not (out_dir / f"{identifier}_seg.npy").is_file():
        return False
    try:
        return load_json(js).get("preprocessing_identity") == identity
    except SamunetError:
        return False


def _run_one(identifier, image_files, seg_file, config, label_values, out_dir, dims=None,
             memory_gb=None) -> tuple[str, str | None]:
    try:
        data, seg, props = preprocess_case(image_files, seg_file, config, label_values, dims, memory_gb)
        atomic_save_npy(out_dir / f"{identifier}.npy", data)
        if seg is not None:
            atomic_save_npy(out_dir / f"{identifier}_seg.npy", seg)
        save_json(props, out_dir / f"{identifier}.json")
        return identifier, None
    except SamunetError as e:
        return identifier, str(e)


def preprocess_cases(cases, config: dict, label_values, out_dir: Path, num_processes: int = 2,
                     desc: str = "preprocess", dims: int | None = None, memory_gb: float | None = None) -> list[str]:
    """Preprocess ``cases`` (objects with identifier, image_files, label_file) into ``out_dir``.

    Finished cases with the same preprocessing identity are skipped. Returns the identifiers processed now.
    Cases that fail are reported together at the end; the others are still written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out_dir)  # left by a run that was killed while writing; a running one's files are kept
    todo = [c for c in cases if not case_is_done(out_dir, c.identifier, config["preprocessing_identity"],
                                                  c.label_file is not None)]
    skipped = len(cases) - len(todo)
    if skipped:
        logger.info("%d of %d case(s) already preprocessed in %s; skipping them", skipped, len(cases), out_dir)
    args = ([c.identifier for c in todo], [c.image_files for c in todo], [c.label_file for c in todo],
            [config] * len(todo), [list(label_values)] * len(todo), [out_dir] * len(todo), [dims] * len(todo),
            [memory_gb] * len(todo))
    if num_processes > 1 and len(todo) > 1:
        with ProcessPoolExecutor(num_processes, initializer=single_threaded_worker) as ex:
            results = list(tqdm(ex.map(_run_one, *args), total=len(todo), desc=desc))
    else:
        results = [_run_one(*a) for a in tqdm(list(zip(*args)), desc=desc)]
    failed = [(i, e) for i, e in results if e]
    if failed:
        raise SamunetError(f"{len(failed)} case(s) could not be preprocessed (the other "
                           f"{len(results) - len(failed)} were written):\n  - " + "\n  - ".join(e for _, e in failed))
    return [i for i, _ in results]
