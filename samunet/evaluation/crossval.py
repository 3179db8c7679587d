"""``samunet_accumulate_crossval_results``: one model's fold validations gathered and evaluated together.

The validation predictions of the given folds are copied into ``crossval_results_folds_<folds>/`` of the model
folder (or ``output_folder``) and evaluated against the preprocessed reference segmentations, as nnU-Net's
``nnUNetv2_accumulate_crossval_results`` does.
"""
from __future__ import annotations

from pathlib import Path

from samunet.evaluation.evaluate import evaluate_folder
from samunet.evaluation.find_best import _gather
from samunet.inference.predict import check_trainer_name, default_trainer
from samunet.paths import preprocessed_folder, resolve_dataset_name, results_folder
from samunet.utils import SamunetError, load_json


def accumulate_crossval_results(dataset, configuration: str, trainer: str | None = None, plans_name="samunetPlans",
                                folds=(0, 1, 2, 3, 4), output_folder=None) -> dict:
    """Evaluate the folds' validations of ``TRAINER__PLANS__CONFIGURATION`` together; returns the summary.
    ``trainer`` defaults to that of the plans' head where it was trained, else of the only trained head."""
    name = resolve_dataset_name(dataset)
    base = results_folder() / name
    if trainer is None:
        trainer = default_trainer(name, configuration, plans_name)
    check_trainer_name(trainer)
    model_dir = base / f"{trainer}__{plans_name}__{configuration}"
    folds = [str(f) for f in folds]
    missing = [f for f in folds if not (model_dir / f"fold_{f}" / "validation" / "summary.json").is_file()]
    if missing:
        raise SamunetError(f"{model_dir}: no final validation for fold(s) {', '.join(missing)} (train them, or "
                           "run samunet_train ... --val)")
    gt = preprocessed_folder() / name / "gt_segmentations"
    if not gt.is_dir():
        raise SamunetError(f"{gt}: reference segmentations not found; run samunet_preprocess -d {name}")
    dataset_json = load_json(model_dir / "dataset.json")
    ending = dataset_json["file_ending"]
    out = Path(output_folder) if output_folder else model_dir / f"crossval_results_folds_{'_'.join(folds)}"
    _gather(model_dir, folds, out, ending, False)
    labels = sorted(v for v in dataset_json["labels"].values() if v != 0)
    cases = sorted(p.name[: -len(ending)] for p in out.iterdir() if p.name.endswith(ending))  # the folds' cases
    return evaluate_folder(gt, out, labels, ending, output_file=out / "summary.json", cases=cases)
