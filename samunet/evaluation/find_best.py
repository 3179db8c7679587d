"""``samunet_find_best_configuration``: compare cross-validation results, try ensembles and post-processing,
and write the inference instructions.

Every trained model folder (``TRAINER__PLANS__CONFIG``, any head or configuration) whose requested folds all have a
final validation takes part. Their validation predictions are gathered into one cross-validation folder and
evaluated together. Models whose validations were saved with probabilities (``samunet_train --npz``) are
ensembled: every pair, as nnU-Net does, and every larger group up to ``max_ensemble_size`` (default
``DEFAULT_MAX_ENSEMBLE_SIZE``: with one labelled Hippocampus case three heads averaged beat every single model and
every pair, see ``benchmarks/results/plateau_ensembles_004_fold0.md``). Keep-largest-component post-processing is
then tried on the best candidate, for each foreground class alone (and all at once), and kept for the classes where
it raises the mean foreground Dice.
"""
from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

from samunet.evaluation.ensemble_postprocess import choose_postprocessing, ensemble_folders
from samunet.evaluation.evaluate import evaluate_folder
from samunet.paths import preprocessed_folder, resolve_dataset_name, results_folder
from samunet.utils import SamunetError, load_json, save_json

logger = logging.getLogger("samunet")

DEFAULT_MAX_ENSEMBLE_SIZE = 3
ENSEMBLE_PREFIX, SEP = "ensemble", "___"


def _gather(model_dir: Path, folds, out: Path, ending: str, with_npz: bool) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    for f in folds:
        val = model_dir / f"fold_{f}" / "validation"
        for p in val.iterdir():
            if p.name.endswith(ending) or (with_npz and p.suffix == ".npz"):
                shutil.copyfile(p, out / p.name)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(model_dir / name, out / name)
    return True


def _fold_cases(pp_dataset: Path, folds) -> list[str] | None:
    """The validation cases of ``folds`` (``splits_final.json``): what the cross-validation folder holds and is
    scored on; None where the splits do not name them (every reference with a prediction is then scored)."""
    splits_file = pp_dataset / "splits_final.json"
    if not splits_file.is_file():
        return None
    splits = load_json(splits_file)
    try:
        return sorted({c for f in folds for c in splits[int(f)]["val"]})
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def ensemble_key(members) -> str:
    return SEP.join([ENSEMBLE_PREFIX, *members])


def ensemble_members(key: str) -> list[str]:
    """The model folders an ``ensemble___A___B[___C...]`` key averages ([] for a single model)."""
    parts = key.split(SEP)
    return parts[1:] if parts[0] == ENSEMBLE_PREFIX else []


def find_best_configuration(dataset, folds=(0, 1, 2, 3, 4), allow_ensembles: bool = True,
                            max_ensemble_size: int = DEFAULT_MAX_ENSEMBLE_SIZE) -> dict:
    if allow_ensembles and max_ensemble_size < 2:
        raise SamunetError(f"--max_ensemble_size {max_ensemble_size}: an ensemble averages at least 2 models "
                           "(use --disable_ensembling for none)")
    name = resolve_dataset_name(dataset)
    res = results_folder() / name
    gt = preprocessed_folder() / name / "gt_segmentations"
    if not gt.is_dir():
        raise SamunetError(f"{gt}: reference segmentations not found; run samunet_preprocess -d {name}")
    folds = [str(f) for f in folds]
    tag = "_".join(folds)
    candidates, skipped = {}, {}
    for model_dir in sorted(p for p in res.glob("*__*__*") if p.is_dir()):
        missing = [f for f in folds if not (model_dir / f"fold_{f}" / "validation" / "summary.json").is_file()]
        if missing:
            skipped[model_dir.name] = f"no final validation for fold(s) {', '.join(missing)}"
            continue
        candidates[model_dir.name] = model_dir
    if not candidates:
        raise SamunetError(f"{res}: no model with a final validation for folds {', '.join(folds)} "
                           f"({'; '.join(f'{k}: {v}' for k, v in skipped.items()) or 'no trained models'})")
    dataset_json = load_json(next(iter(candidates.values())) / "dataset.json")
    ending = dataset_json["file_ending"]
    labels = sorted(v for v in dataset_json["labels"].values() if v != 0)
    work = res / f"crossval_results_folds_{tag}"
    has_npz, summaries = {}, {}  # each model's (or ensemble's) cross-validation predictions lie in work / key

    cases = _fold_cases(gt.parent, folds)  # with some folds only, the others' references are not missed

    def evaluate(key: str) -> None:
        summaries[key] = evaluate_folder(gt, work / key, labels, ending, output_file=work / key / "summary.json",
                                         chill=True, cases=cases)

    for key, model_dir in candidates.items():
        has_npz[key] = all(list((model_dir / f"fold_{f}" / "validation").glob("*.npz")) for f in folds)
        _gather(model_dir, folds, work / key, ending, has_npz[key])
        evaluate(key)
    with_npz = sorted(k for k in candidates if has_npz[k]) if allow_ensembles else []
    for size in range(2, min(max_ensemble_size, len(with_npz)) + 1):
        for members in itertools.combinations(with_npz, size):
            key = ensemble_key(members)
            ensemble_folders([work / m for m in members], work / key, ending)
            evaluate(key)
    results = {key: s["foreground_mean"]["Dice"] for key, s in summaries.items()}
    best = max(results, key=results.get)
    choice = choose_postprocessing(work / best, gt, labels, ending, work / f"postprocessing_{best}", cases=cases,
                                   before=summaries[best])  # the best folder is not evaluated a second time
    pp = {"keep_largest_component": choice["keep_largest_component"]}
    pp_classes, trials, final_dice = pp["keep_largest_component"], choice["trials"], choice["mean_foreground_dice"]
    summary = {"dataset": name, "folds": folds, "results": results, "skipped": skipped, "best": best,
               "best_foreground_dice": results[best], "postprocessing": pp, "postprocessing_trials": trials,
               "foreground_dice_after_postprocessing": final_dice}
    save_json(summary, res / "inference_information.json")
    save_json(pp, res / "postprocessing.json")
    (res / "inference_instructions.txt").write_text(_instructions(name, best, folds, pp), encoding="utf-8")
    logger.info("best: %s (cross-validation foreground Dice %.4f%s)", best, results[best],
                f", {final_dice:.4f} with post-processing" if pp_classes else "")
    return summary


def _predict_cmd(name: str, model_key: str, folds, out: str, npz: bool) -> str:
    return (f"samunet_predict_from_modelfolder -i INPUT_FOLDER -o {out} -m $samunet_results/{name}/{model_key} "
            f"-f {' '.join(folds)}" + (" --save_probabilities" if npz else ""))


def _instructions(name: str, best: str, folds, pp: dict) -> str:
    lines = [f"Inference instructions for {name} (from samunet_find_best_configuration)", ""]
    members = ensemble_members(best)
    if members:
        outputs = [f"OUTPUT_FOLDER_MODEL_{i}" for i in range(1, len(members) + 1)]
        lines += [f"Predict with the {len(members)} models, keeping probabilities, then ensemble:",
                  *(_predict_cmd(name, m, folds, o, True) for m, o in zip(members, outputs)),
                  f"samunet_ensemble -i {' '.join(outputs)} -o OUTPUT_FOLDER"]
    else:
        lines += ["Predict:", _predict_cmd(name, best, folds, "OUTPUT_FOLDER", False)]
    if pp.get("keep_largest_component"):
        lines += ["", "Then post-process (keep the largest component of classes "
                  f"{pp['keep_largest_component']}):",
                  f"samunet_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP "
                  f"-pp_pkl_file $samunet_results/{name}/postprocessing.json"]
    return "\n".join(lines) + "\n"
