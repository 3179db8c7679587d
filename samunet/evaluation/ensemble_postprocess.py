"""Ensembling saved probabilities and keep-largest-component post-processing.

``samunet_ensemble -i F1 F2 ... -o OUT`` averages the ``CASE.npz`` probabilities that ``samunet_predict
--save_probabilities`` (or ``samunet_train --npz`` for validation) wrote, and writes label maps with the geometry of
the first folder's label file for that case. Post-processing keeps, for the chosen classes, only the largest
connected component, as nnU-Net's post-processing does; ``choose_postprocessing`` decides for which classes, from
validation predictions, by nnU-Net's rule.
"""
from __future__ import annotations

import logging
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage

from samunet.dataset.io import read_seg, write_seg
from samunet.utils import SamunetError, check_writable_folder, load_json, save_json

logger = logging.getLogger("samunet")


def _metadata_folder(folder: Path) -> Path:
    """Where a prediction folder's dataset.json / plans.json are: in it (samunet_predict), or, for a fold's final
    validation (``MODEL/fold_K/validation``), in the model folder."""
    for candidate in (folder, folder.parent.parent):
        if (candidate / "dataset.json").is_file() or (candidate / "plans.json").is_file():
            return candidate
    raise SamunetError(f"{folder}: no dataset.json or plans.json (in it, or in the model folder of a fold's "
                       "validation) to take the label values and file ending from")


def _label_values(folder: Path) -> list[int]:
    meta_folder = _metadata_folder(folder)
    for name in ("dataset.json", "plans.json"):
        if (meta_folder / name).is_file():
            meta = load_json(meta_folder / name)
            if "labels" in meta:
                return sorted(int(v) for v in meta["labels"].values())
            if "label_values" in meta:
                return sorted(int(v) for v in meta["label_values"])
    raise SamunetError(f"{meta_folder}: dataset.json / plans.json name no label values")


def file_ending_of(folder: Path) -> str:
    meta_folder = _metadata_folder(Path(folder))
    for name in ("dataset.json", "plans.json"):
        if (meta_folder / name).is_file() and "file_ending" in load_json(meta_folder / name):
            return load_json(meta_folder / name)["file_ending"]
    raise SamunetError(f"{meta_folder}: dataset.json / plans.json name no file_ending")


_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def probabilities_header(path: Path) -> tuple:
    """Shape of the ``probabilities`` array in ``CASE.npz``, read from its header; refuses anything else."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("probabilities.npy") as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
    except _NPZ_ERRORS as e:
        raise SamunetError(f"{path}: not a readable probabilities file (truncated or corrupt .npz, or no "
                           f"'probabilities' array: {type(e).__name__}: {e})") from None
    if dtype.hasobject or dtype.kind != "f" or len(shape) < 2:
        raise SamunetError(f"{path}: 'probabilities' must be a float array (classes, ...), found dtype {dtype} "
                           f"of shape {tuple(shape)}; samunet never loads object arrays")
    return tuple(shape)


def load_probabilities(path: Path) -> np.ndarray:
    probabilities_header(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["probabilities"].astype(np.float32)
    except _NPZ_ERRORS as e:
        raise SamunetError(f"{path}: not a readable probabilities file (truncated or corrupt .npz: "
                           f"{type(e).__name__}: {e})") from None


def ensemble_folders(input_folders, output_folder, file_ending: str | None = None) -> list[str]:
    folders = [Path(f) for f in input_folders]
    if len(folders) < 2:
        raise SamunetError("give at least two folders to ensemble")
    for f in folders:
        if not f.is_dir():
            raise SamunetError(f"{f}: folder not found")
    label_values = np.asarray(_label_values(folders[0]))
    meta_folder = _metadata_folder(folders[0])
    file_ending = file_ending or file_ending_of(folders[0])
    cases = sorted(set.intersection(*[{p.name[:-4] for p in f.glob("*.npz")} for f in folders]))
    if not cases:
        raise SamunetError("the folders have no CASE.npz probabilities in common; predict with --save_probabilities")
    # every input is opened (header only) before anything is written, so a bad file stops the run up front
    for case in cases:
        shapes = [(f / f"{case}.npz", probabilities_header(f / f"{case}.npz")) for f in folders]
        for path, shape in shapes[1:]:
            if shape != shapes[0][1]:
                raise SamunetError(f"{path}: probabilities of shape {shape} do not match {shapes[0][0]} "
                                   f"({shapes[0][1]})")
        if not (folders[0] / f"{case}{file_ending}").is_file():
            raise SamunetError(f"{folders[0] / (case + file_ending)}: label file missing; it supplies the geometry "
                               f"of case {case}")
    out = check_writable_folder(output_folder, "the output folder (-o)")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):
        if (meta_folder / name).is_file():
            shutil.copyfile(meta_folder / name, out / name)
    for case in cases:
        probs = None
        for f in folders:
            p = load_probabilities(f / f"{case}.npz")
            probs = p if probs is None else probs + p
        ref_file = folders[0] / f"{case}{file_ending}"
        if not ref_file.is_file():
            raise SamunetError(f"{ref_file}: label file missing; it supplies the geometry of case {case}")
        _, props = read_seg(ref_file)
        write_seg(label_values[probs.argmax(0)], props, out / f"{case}{file_ending}")
    logger.info("ensembled %d case(s) of %d folders into %s", len(cases), len(folders), out)
    return cases


def keep_largest_component(seg: np.ndarray, classes) -> np.ndarray:
    """For each class in ``classes`` keep only its largest connected component (26/8-connectivity)."""
    seg = seg.copy()
    squeezed = seg[0] if seg.shape[0] == 1 else seg
    structure = ndimage.generate_binary_structure(squeezed.ndim, squeezed.ndim)
    for c in classes:
        mask = squeezed == c
        lab, n = ndimage.label(mask, structure)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            squeezed[(lab > 0) & (lab != 1 + int(np.argmax(sizes)))] = 0
    return seg


def apply_postprocessing_folder(input_folder, output_folder, postprocessing: dict, file_ending: str) -> int:
    """Apply ``{"keep_largest_component": [classes]}`` to every label file of a folder."""
    classes = postprocessing.get("keep_largest_component", [])
    inp, out = Path(input_folder), Path(output_folder)
    if not inp.is_dir():
        raise SamunetError(f"{inp}: folder not found")
    files = sorted(p for p in inp.iterdir() if p.name.endswith(file_ending) and not p.name.startswith("."))
    if not files:
        raise SamunetError(f"{inp}: no label files ending in {file_ending}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):
        if (inp / name).is_file():
            shutil.copyfile(inp / name, out / name)
    for f in files:
        seg, props = read_seg(f)
        write_seg(keep_largest_component(seg, classes) if classes else seg, props, out / f.name)
    save_json(postprocessing, out / "postprocessing.json")
    return len(files)


def choose_postprocessing(pred_folder, gt_folder, labels, file_ending: str, work_folder, cases=None,
                          before: dict | None = None) -> dict:
    """Decide keep-largest-component post-processing from validation predictions, as nnU-Net's find-best does.

    Tried on ``pred_folder`` (not modified) for each foreground class alone, and for all of them at once when there
    are several; it is kept for each class whose trial raises the mean foreground Dice against ``gt_folder`` by more
    than 1e-4. A class's Dice depends only on its own mask, so these per-class decisions together give the best of
    the combinations. Each trial's folder (``work_folder/<classes>``) holds its ``summary.json``. ``before``: the
    summary of ``pred_folder`` as predicted, when the caller has already evaluated it (not evaluated again).

    Returns ``{"keep_largest_component": classes, "mean_foreground_dice_before", "mean_foreground_dice",
    "dice_per_class", "trials"}`` (``trials``: mean foreground Dice per trial, keyed by its classes joined with '_'),
    the Dice figures after the chosen post-processing.
    """
    from samunet.evaluation.evaluate import evaluate_folder

    labels = [int(c) for c in labels]
    work = Path(work_folder)
    work.mkdir(parents=True, exist_ok=True)

    def score(folder: Path, output_file: Path) -> dict:
        return evaluate_folder(gt_folder, folder, labels, file_ending, output_file=output_file, chill=True,
                               cases=cases)

    if before is None:
        before = score(Path(pred_folder), work / "summary_as_predicted.json")
    base = before["foreground_mean"]["Dice"]
    options = [[c] for c in labels] + ([labels] if len(labels) > 1 else [])
    trials, summaries = {}, {"": before}
    for classes in options:
        key = "_".join(map(str, classes))
        apply_postprocessing_folder(pred_folder, work / key, {"keep_largest_component": classes}, file_ending)
        summaries[key] = score(work / key, work / key / "summary.json")
        trials[key] = summaries[key]["foreground_mean"]["Dice"]
    kept = [c for c in labels if trials[str(c)] > base + 1e-4]
    key = "_".join(map(str, kept))
    if key not in summaries:  # some of several classes: score that combination
        apply_postprocessing_folder(pred_folder, work / key, {"keep_largest_component": kept}, file_ending)
        summaries[key] = score(work / key, work / key / "summary.json")
    chosen = summaries[key]
    return {"keep_largest_component": kept, "mean_foreground_dice_before": base,
            "mean_foreground_dice": chosen["foreground_mean"]["Dice"],
            "dice_per_class": {k: v["Dice"] for k, v in chosen["mean"].items()}, "trials": trials}
