"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Files are paired by name. The result is written to ``summary.json`` in the layout of nnU-Net v2:

- ``metric_per_case``: one entry per case with ``prediction_file``, ``reference_file`` and ``metrics``
  (label as a string -> metric name -> value)
- ``mean``: label -> metric -> mean over cases
- ``foreground_mean``: metric -> mean over the evaluated labels

plus ``settings`` (labels, file ending, NSD tolerance, ignore label, files without a partner). Means ignore NaN;
see :mod:`samunet.evaluation.metrics` for the metrics and the conventions for empty masks. NaN values are written
as ``NaN``, as nnU-Net does (Python's json module reads them back).
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from samunet.dataset.io import SUPPORTED_ENDINGS, read_seg
from samunet.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM, compute_metrics, mean_metrics
from samunet.utils import SamunetError, load_json, save_json

log = logging.getLogger("samunet")

SUMMARY_NAME = "summary.json"


def _files(folder: Path, file_ending: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith(file_ending))


def evaluate_case(reference_file: str | Path, prediction_file: str | Path, labels: Sequence[int],
                  nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, ignore_label: int | None = None) -> dict:
    """Metrics of one prediction file against its reference file (one ``metric_per_case`` entry)."""
    reference_file, prediction_file = Path(reference_file), Path(prediction_file)
    ref, ref_props = read_seg(reference_file)
    pred, pred_props = read_seg(prediction_file)
    if ref.shape != pred.shape:
        raise SamunetError(f"{prediction_file}: shape {tuple(pred.shape)} does not match the reference "
                           f"{reference_file} with shape {tuple(ref.shape)}")
    sp_ref, sp_pred = np.asarray(ref_props["spacing"], float), np.asarray(pred_props["spacing"], float)
    if not np.allclose(sp_ref, sp_pred, rtol=1e-3, atol=1e-3):
        raise SamunetError(f"{prediction_file}: spacing {tuple(sp_pred.tolist())} does not match the reference "
                           f"{reference_file} with spacing {tuple(sp_ref.tolist())}")
    for key in ("origin", "direction"):
        a, b = np.asarray(ref_props[key], float), np.asarray(pred_props[key], float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-3):
            log.warning("%s: %s %s differs from the reference %s (%s); evaluating voxel by voxel anyway",
                        prediction_file, key, tuple(np.round(b, 4).tolist()), reference_file,
                        tuple(np.round(a, 4).tolist()))
    metrics = compute_metrics(ref, pred, labels, sp_ref, nsd_tolerance_mm, ignore_label)
    return {"prediction_file": str(prediction_file), "reference_file": str(reference_file), "metrics": metrics}


def _evaluate_case_args(args: tuple) -> dict:
    return evaluate_case(*args)


def evaluate_folder(gt_folder: str | Path, pred_folder: str | Path, labels: Sequence[int], file_ending: str,
                    num_processes: int = 2, output_file: str | Path | None = None,
                    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, chill: bool = False,
                    ignore_label: int | None = None, cases: Sequence[str] | None = None) -> dict:
    """Evaluate every reference file in ``gt_folder`` against the file of the same name in ``pred_folder``.

    ``labels`` are the label values to evaluate (usually the foreground labels). A reference without a prediction
    is an error naming it, unless ``chill`` is set: then only the references that have a prediction are evaluated.
    Predictions without a reference are skipped with a warning. ``cases`` (identifiers) restricts the evaluation
    to those references, e.g. the validation cases of one fold. ``output_file`` defaults to
    ``pred_folder/summary.json``; it is written atomically. Returns the summary dict.
    """
    gt_folder, pred_folder = Path(gt_folder), Path(pred_folder)
    for name, folder in (("reference", gt_folder), ("prediction", pred_folder)):
        if not folder.is_dir():
            raise SamunetError(f"{folder}: {name} folder not found")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise SamunetError(f"file ending must start with '.', got {file_ending!r}")
    labels = [int(v) for v in labels]
    if not labels:
        raise SamunetError("no labels to evaluate")
    if len(set(labels)) != len(labels):
        raise SamunetError(f"labels are given more than once: {labels}")
    if nsd_tolerance_mm < 0:
        raise SamunetError(f"the NSD tolerance must be >= 0 mm, got {nsd_tolerance_mm}")
    refs = _files(gt_folder, file_ending)
    if cases is not None:
        wanted = {f"{c}{file_ending}" for c in cases}
        absent = sorted(wanted - set(refs))
        if absent:
            raise SamunetError(f"{gt_folder}: no reference for {', '.join(absent[:5])}")
        refs = [f for f in refs if f in wanted]
    preds = set(_files(pred_folder, file_ending))
    if not refs:
        raise SamunetError(f"{gt_folder}: no reference files ending in {file_ending}")
    missing = [f for f in refs if f not in preds]
    if missing and not chill:
        shown = ", ".join(str(pred_folder / f) for f in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SamunetError(f"{len(missing)} of {len(refs)} predictions are missing: {shown}{more} "
                           "(use --chill / chill=True to evaluate only the predictions that exist)")
    if missing:
        log.warning("%d of %d predictions are missing in %s; evaluating the other %d", len(missing), len(refs),
                    pred_folder, len(refs) - len(missing))
    unmatched = sorted(preds - set(refs))
    if unmatched:
        log.warning("%d prediction(s) in %s have no reference in %s and are skipped (e.g. %s)", len(unmatched),
                    pred_folder, gt_folder, unmatched[0])
    pairs = [f for f in refs if f in preds]
    if not pairs:
        raise SamunetError(f"{pred_folder}: none of the {len(refs)} reference files has a prediction")
    jobs = [(gt_folder / f, pred_folder / f, labels, float(nsd_tolerance_mm), ignore_label) for f in pairs]
    if num_processes <= 1 or len(jobs) == 1:
        per_case = [_evaluate_case_args(j) for j in jobs]
    else:
        with ProcessPoolExecutor(min(num_processes, len(jobs))) as ex:
            per_case = list(ex.map(_evaluate_case_args, jobs, chunksize=max(1, len(jobs) // (4 * num_processes))))
    mean, foreground_mean = mean_metrics([c["metrics"] for c in per_case], labels)
    summary = {
        "foreground_mean": foreground_mean,
        "mean": mean,
        "metric_per_case": per_case,
        "settings": {
            "labels": labels,
            "file_ending": file_ending,
            "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "ignore_label": ignore_label,
            "missing_predictions": missing,
            "predictions_without_reference": unmatched,
        },
    }
    output_file = Path(output_file) if output_file is not None else pred_folder / SUMMARY_NAME
    save_json(summary, output_file)
    log.info("evaluated %d case(s); foreground mean Dice %.4f, HD95 %.3f mm, NSD@%gmm %.4f -> %s", len(per_case),
             foreground_mean.get("Dice", float("nan")), foreground_mean.get("HD95", float("nan")),
             nsd_tolerance_mm, foreground_mean.get("NSD", float("nan")), output_file)
    return summary


def detect_file_ending(folder: str | Path) -> str:
    """The one supported file ending shared by the files in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SamunetError(f"{folder}: folder not found")
    found = set()
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith("."):
            for e in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
                if p.name.lower().endswith(e):
                    found.add(p.name[-len(e):])
                    break
    if not found:
        raise SamunetError(f"{folder}: no image files with a supported ending ({', '.join(SUPPORTED_ENDINGS)})")
    if len(found) > 1:
        raise SamunetError(f"{folder}: files with several endings ({', '.join(sorted(found))}); "
                           "give the file ending explicitly")
    return found.pop()


def evaluate_simple(gt_folder: str | Path, pred_folder: str | Path, labels: Sequence[int],
                    output_file: str | Path | None = None, num_processes: int = 2, chill: bool = False,
                    ignore_label: int | None = None, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    file_ending: str | None = None) -> dict:
    """:func:`evaluate_folder` without a dataset.json: labels are given, the file ending is taken from the
    reference folder unless given."""
    if file_ending is None:
        file_ending = detect_file_ending(gt_folder)
    return evaluate_folder(gt_folder, pred_folder, labels, file_ending, num_processes, output_file,
                           nsd_tolerance_mm, chill, ignore_label)


def labels_from_dataset_json(dataset_json: dict, source: str = "dataset.json") -> tuple[list[int], int | None]:
    """Foreground label values and the ignore label (or None) declared in a dataset.json."""
    declared = dataset_json.get("labels")
    if not isinstance(declared, dict) or not declared:
        raise SamunetError(f"{source}: no 'labels' object")
    labels, ignore = [], None
    for name, value in declared.items():
        if isinstance(value, (list, tuple)):
            raise SamunetError(f"{source}: label '{name}' is a region {value}; region-based evaluation is not "
                               "supported, use samunet_evaluate_simple with label values")
        if not isinstance(value, int) or isinstance(value, bool):
            raise SamunetError(f"{source}: label '{name}' must be an integer, got {value!r}")
        if name == "ignore":
            ignore = value
        elif value != 0:
            labels.append(value)
    if not labels:
        raise SamunetError(f"{source}: no foreground labels declared")
    return sorted(labels), ignore


def evaluate_folder_from_dataset_json(gt_folder: str | Path, pred_folder: str | Path,
                                      dataset_json_file: str | Path, plans_file: str | Path | None = None,
                                      output_file: str | Path | None = None, num_processes: int = 2,
                                      chill: bool = False,
                                      nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> dict:
    """:func:`evaluate_folder` with the foreground labels (and an ``ignore`` label, if declared) and the file
    ending taken from a dataset.json; a plans file may supply the file ending when the dataset.json has none."""
    dataset_json = load_json(dataset_json_file)
    if not isinstance(dataset_json, dict):
        raise SamunetError(f"{dataset_json_file}: expected a JSON object at the top level")
    labels, ignore = labels_from_dataset_json(dataset_json, str(dataset_json_file))
    file_ending = dataset_json.get("file_ending")
    if plans_file is not None:
        plans = load_json(plans_file)
        plans_ending = plans.get("file_ending") if isinstance(plans, dict) else None
        if file_ending is None:
            file_ending = plans_ending
        elif plans_ending is not None and plans_ending != file_ending:
            raise SamunetError(f"{plans_file}: file_ending {plans_ending!r} differs from {file_ending!r} in "
                               f"{dataset_json_file}")
    if file_ending is None:
        raise SamunetError(f"{dataset_json_file}: no 'file_ending'")
    return evaluate_folder(gt_folder, pred_folder, labels, file_ending, num_processes, output_file,
                           nsd_tolerance_mm, chill, ignore)
