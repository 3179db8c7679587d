"""Data set fingerprint: geometry, intensity and class statistics the planner decides from.

Foreground intensities are sampled as nnU-Net v2 does: about 1e8 foreground voxels in total, spread evenly over
the cases (all of a case's foreground voxels when it has fewer), seeded, per channel.

For each class (background included) the fingerprint records its size in voxels, its number of connected objects
and the typical width of its structures: twice the Euclidean distance to the class boundary measured on the
class's medial ridge (local maxima of the distance map), minus one voxel, in millimetres. Thin structures (vessels,
membranes) have small widths; the planner uses this to avoid shrinking them away.
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from samunet import __version__
from samunet.dataset.case_checks import dataset_geometry_problems, image_problems, label_problems
from samunet.dataset.dataset_json import Case, DatasetInfo, load_dataset_json, training_cases
from samunet.dataset.io import read_images, read_seg
from samunet.preprocessing.cropping import crop_to_nonzero
from samunet.utils import SamunetError, single_threaded_worker

logger = logging.getLogger("samunet")

TOTAL_FOREGROUND_SAMPLES = int(1e8)


def structure_widths(mask: np.ndarray, spacing) -> np.ndarray:
    """Widths (mm) of a binary structure sampled along its medial ridge; empty if the mask is empty."""
    if not mask.any():
        return np.zeros(0)
    if mask.all():
        return np.array([2.0 * min(s * n for s, n in zip(spacing, mask.shape))])
    edt = ndimage.distance_transform_edt(mask, sampling=spacing)
    ridge = (edt >= ndimage.maximum_filter(edt, size=3)) & mask
    return 2.0 * edt[ridge] - min(spacing)


def _case_fingerprint(case: Case, label_values: list[int], n_samples: int, seed: int) -> dict:
    """The case's statistics, or ``{"problems": [...]}`` when it breaks a per-case invariant."""
    try:
        data, props = read_images(case.image_files)
        seg, seg_props = read_seg(case.label_file)
    except SamunetError as e:
        return {"problems": [str(e)]}
    problems = image_problems(data, props) + label_problems(data, props, seg, seg_props, case.label_file,
                                                            label_values)
    if problems:
        return {"problems": problems}
    shape_before = list(data.shape[1:])
    data, seg, bbox = crop_to_nonzero(data, seg)
    rng = np.random.default_rng(seed)
    fg = seg > 0
    samples = []
    for c in range(data.shape[0]):
        values = data[c][fg]
        if values.size > n_samples:
            values = rng.choice(values, n_samples, replace=False)
        samples.append(values.astype(np.float32))
    # 2D files: measure in-plane only (the dummy axis has spacing 999)
    two_d = props["dims"] == 2
    spacing = props["spacing"][1:] if two_d else props["spacing"]
    seg_m = seg[0] if two_d else seg
    structure = ndimage.generate_binary_structure(seg_m.ndim, seg_m.ndim)
    classes = {}
    for v in label_values:
        mask = seg_m == v
        n_vox = int(mask.sum())
        n_obj = int(ndimage.label(mask, structure)[1]) if n_vox else 0
        w = structure_widths(mask, spacing)
        classes[str(v)] = {"voxels": n_vox, "objects": n_obj,
                           "median_width_mm": float(np.median(w)) if w.size else None}
    return {
        "identifier": case.identifier,
        "spacing": props["spacing"],
        "io": props["io"],
        "dims": props["dims"],
        "dtype": props["dtype"],
        "shape_before_crop": shape_before,
        "shape_after_crop": list(data.shape[1:]),
        "foreground_samples": samples,
        "classes": classes,
    }


def _intensity_stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {k: None for k in ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")}
    p = np.percentile(values, [0.5, 50, 99.5])
    return {"mean": float(values.mean()), "median": float(p[1]), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_00_5": float(p[0]), "percentile_99_5": float(p[2])}


def compute_fingerprint(dataset_folder: str | Path, num_processes: int = 2, seed: int = 12345) -> dict:
    folder = Path(dataset_folder)
    info: DatasetInfo = load_dataset_json(folder)
    cases = training_cases(info)
    if not cases:
        raise SamunetError(f"{folder / 'imagesTr'}: no cases found with file ending {info.file_ending}")
    n_samples = max(1, TOTAL_FOREGROUND_SAMPLES // len(cases))
    args = (cases, [info.label_values] * len(cases), [n_samples] * len(cases),
            [seed + i for i in range(len(cases))])
    desc = f"fingerprint {folder.name}"
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes, initializer=single_threaded_worker) as ex:
            per_case = list(tqdm(ex.map(_case_fingerprint, *args, chunksize=4), total=len(cases), desc=desc))
    else:
        per_case = [_case_fingerprint(*a) for a in tqdm(list(zip(*args)), desc=desc)]
    problems = [p for pc in per_case for p in pc.get("problems", [])]
    problems += dataset_geometry_problems([{"file": str(c.image_files[0]), "dims": pc["dims"], "spacing": pc["spacing"]}
                                           for c, pc in zip(cases, per_case) if "problems" not in pc])
    if problems:
        raise SamunetError(f"data set {folder.name}: {len(problems)} problem(s), nothing was written "
                           "(--verify_dataset_integrity checks everything):\n  - " + "\n  - ".join(problems))
    intensity = {}
    for c in range(info.num_channels):
        values = np.concatenate([pc["foreground_samples"][c] for pc in per_case])
        intensity[str(c)] = _intensity_stats(values)
    class_props = {}
    for v, name in zip(info.label_values, info.class_names):
        vox = np.array([pc["classes"][str(v)]["voxels"] for pc in per_case])
        obj = np.array([pc["classes"][str(v)]["objects"] for pc in per_case])
        widths = [pc["classes"][str(v)]["median_width_mm"] for pc in per_case]
        widths = [w for w in widths if w is not None]
        present = vox > 0
        class_props[str(v)] = {
            "name": name,
            "cases_present": int(present.sum()),
            "median_voxels_per_case": float(np.median(vox[present])) if present.any() else 0.0,
            "min_voxels_per_case": int(vox[present].min()) if present.any() else 0,
            "median_objects_per_case": float(np.median(obj[present])) if present.any() else 0.0,
            "total_objects": int(obj.sum()),
            "median_width_mm": float(np.median(widths)) if widths else None,
        }
    before = np.array([pc["shape_before_crop"] for pc in per_case], float)
    after = np.array([pc["shape_after_crop"] for pc in per_case], float)
    return {
        "samunet_version": __version__,
        "dataset_name": folder.name,
        "num_cases": len(cases),
        "num_channels": info.num_channels,
        "channel_names": info.channel_names,
        "file_ending": info.file_ending,
        "io": sorted({pc["io"] for pc in per_case}),
        "dims": sorted({pc["dims"] for pc in per_case}),
        "image_dtypes": sorted({pc["dtype"] for pc in per_case}),
        "case_identifiers": [pc["identifier"] for pc in per_case],
        "spacings": [pc["spacing"] for pc in per_case],
        "shapes_before_crop": [pc["shape_before_crop"] for pc in per_case],
        "shapes_after_crop": [pc["shape_after_crop"] for pc in per_case],
        "median_relative_size_after_cropping": float(np.median(np.prod(after, 1) / np.prod(before, 1))),
        "foreground_intensity_properties_per_channel": intensity,
        "foreground_samples_per_case": n_samples,
        "class_properties": class_props,
        "seed": seed,
    }
