"""Ensembles of the plateau study's samunet models, chosen by ``samunet_find_best_configuration``, against nnU-Net.

For every labelled-cases column of a label-efficiency study (``label_efficiency.py --plateau``), this gathers the
samunet models of that column whose final validation saved probabilities (``samunet_train ... --val --npz`` on a
trained fold adds them in seconds to minutes), lets ``samunet_find_best_configuration -f FOLD`` evaluate each, every
ensemble of 2 to ``--max_ensemble_size`` of them and keep-largest-component post-processing, exactly as a user's
run would, and sets the chosen result beside nnU-Net 2d's cells of the same column (read from the study's JSON files).

    python benchmarks/plateau_ensembles.py --dataset 4 --fold 0 --labeled 1 all \\
        --results $STUDY/results $STUDY/results_e200 \\
        --study benchmarks/results/label_efficiency_004_fold0_plateau.json

Each column's model folders are linked (not copied) into ``benchmarks/work/plateau_ensembles_<dataset>_fold<K>/
n<N>/samunet_results`` so that find-best sees that column alone; a model name found under several ``--results``
roots is taken from the first. Writes ``benchmarks/results/plateau_ensembles_<dataset>_fold<K>.{json,md}``.

The choice among single models and ensembles is made on the same validation cases that report its Dice (one fold),
as find-best's choice on a cross-validation is: the more candidates, the more optimistic the chosen figure. The
report therefore lists every candidate, not only the chosen one. An ensemble of k models costs k trainings and,
at prediction, k heads (sharing the encoder only when they share a configuration).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from samunet.evaluation.find_best import ensemble_members

HERE = Path(__file__).resolve().parent


def dataset_name(dataset: str, roots: list[Path]) -> str:
    if not dataset.isdigit():
        return dataset
    for root in roots:
        for p in sorted(root.glob(f"Dataset{int(dataset):03d}_*")):
            return p.name
    sys.exit(f"error: {roots[0]}: no Dataset{int(dataset):03d}_* folder under the --results roots")


def column_of(trainer: str) -> str | None:
    """The labelled-cases column of a samunet trainer folder name (``samunetTrainer_HEAD[_nN]``): 'N' or 'all'."""
    if not trainer.startswith("samunetTrainer_"):
        return None
    m = re.search(r"_n(\d+)$", trainer)
    return m.group(1) if m else "all"


def column_models(roots: list[Path], name: str, fold: int, column: str) -> tuple[dict, dict]:
    """{model folder name: path} of the column's models with validation probabilities, and {name: why skipped}."""
    models, skipped = {}, {}
    for root in roots:
        for model in sorted(p for p in (root / name).glob("*__*__*") if p.is_dir()):
            if column_of(model.name.split("__")[0]) != column:
                continue
            val = model / f"fold_{fold}" / "validation"
            where = f"{model.name} in {root.name}"  # root names only: the report carries no machine's paths
            if model.name in models:
                skipped[where] = f"the same model name was taken from {models[model.name].parent.parent.name}"
            elif not (val / "summary.json").is_file():
                skipped[where] = "no final validation"
            elif not any(val.glob("*.npz")):
                skipped[where] = "validation without probabilities (samunet_train ... --val --npz adds them)"
            else:
                models[model.name] = model
    return models, skipped


def nnunet_cells(study_files: list[Path], column: str) -> list[dict]:
    cells = []
    for f in study_files:
        report = json.loads(f.read_text())
        for key, c in report.get("cells", {}).items():
            if c.get("method") == "nnunet" and str(c.get("labeled")) == column:
                cells.append({"study": f.name, "mean_foreground_dice": c["mean_foreground_dice"],
                              "postprocessed": (c.get("postprocessed") or {}).get("mean_foreground_dice"),
                              "iterations_done": c.get("iterations_done"), "still_rising": c.get("still_rising")})
    return cells


def run_column(a, name: str, column: str, roots: list[Path], work: Path) -> dict:
    models, skipped = column_models(roots, name, a.fold, column)
    record = {"labeled": column, "models": {k: v.parent.parent.name for k, v in models.items()}, "skipped": skipped,
              "nnunet": nnunet_cells([Path(f) for f in a.study], column)}
    if not models:
        return record
    res = work / f"n{column}" / "samunet_results"
    folder = res / name
    if folder.exists():  # a fresh view of the column: links and find-best's outputs only
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    for key, path in models.items():
        (folder / key).symlink_to(path.resolve(), target_is_directory=True)
    env = {**os.environ, "samunet_results": str(res)}
    cmd = [str(Path(sys.executable).parent / "samunet_find_best_configuration"), name, "-f", str(a.fold),
           "--max_ensemble_size", str(a.max_ensemble_size)]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {folder}: samunet_find_best_configuration failed:\n{r.stderr[-2000:]}")
    info = json.loads((folder / "inference_information.json").read_text())
    record.update({"command": "samunet_find_best_configuration " + " ".join(cmd[1:]),
                   "find_best_wall_s": round(time.time() - t0, 1), "results": info["results"], "best": info["best"],
                   "best_foreground_dice": info["best_foreground_dice"],
                   "postprocessing": info["postprocessing"],
                   "foreground_dice_after_postprocessing": info["foreground_dice_after_postprocessing"],
                   "best_single_model": max(models, key=info["results"].get)})
    return record


def short(key: str) -> str:
    """'ensemble___samunetTrainer_cnn_n1__samunetPlans__2d___...' -> 'cnn (2d) + ...'; a plans variant is named
    ('hybrid (2d, samunetPlansDS)')."""
    out = []
    for p in ensemble_members(key) or [key]:
        trainer, plans, config = p.split("__")
        head = re.sub(r"_n\d+$", "", trainer[len("samunetTrainer_"):])
        out.append(f"{head} ({config}{'' if plans == 'samunetPlans' else ', ' + plans})")
    return " + ".join(out)


def markdown(report: dict) -> str:
    lines = [f"# Ensembles chosen by find-best, {report['dataset']} fold {report['fold']}", "",
             f"Command: `{report['command']}`", "",
             "| labelled cases | best single samunet model | find-best's choice (up to "
             f"{report['max_ensemble_size']} models) | after its post-processing | nnU-Net 2d (as predicted / "
             "post-processed, iterations) |", "| --- | --- | --- | --- | --- |"]
    for col in report["columns"]:
        if "best" not in col:
            lines.append(f"| {col['labeled']} | no model with validation probabilities | | | |")
            continue
        single = col["best_single_model"]
        nn = "; ".join(f"{c['mean_foreground_dice']:.4f}"
                       + (f" / {c['postprocessed']:.4f}" if c["postprocessed"] is not None else "")
                       + f", {c['iterations_done']} it" + (" (still rising)" if c["still_rising"] else "")
                       for c in col["nnunet"]) or "not in the study files"
        lines.append(f"| {col['labeled']} | {short(single)}: {col['results'][single]:.4f} | {short(col['best'])}: "
                     f"{col['best_foreground_dice']:.4f} | {col['foreground_dice_after_postprocessing']:.4f} "
                     f"(largest component of classes {col['postprocessing']['keep_largest_component'] or 'none'}) "
                     f"| {nn} |")
    lines += ["", "Every candidate (mean foreground Dice on the fold's validation cases):", ""]
    for col in report["columns"]:
        for key, dice in sorted(col.get("results", {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"- {col['labeled']} labelled: {short(key)}: {dice:.4f}")
        for where, why in col["skipped"].items():
            lines.append(f"- {col['labeled']} labelled, left out: {where}: {why}")
    lines += ["", "The choice is made on the same validation cases that report its Dice; an ensemble of k models "
              "costs k trainings and k heads at prediction."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="4")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--labeled", nargs="+", default=["1", "5", "20", "all"])
    p.add_argument("--results", nargs="+", default=[os.environ.get("samunet_results", "")],
                   help="samunet_results roots holding the study's models (default: $samunet_results)")
    p.add_argument("--study", nargs="*", default=[str(HERE / "results" / "label_efficiency_004_fold0_plateau.json")],
                   help="label-efficiency JSON files whose nnU-Net cells are compared")
    p.add_argument("--max_ensemble_size", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    roots = [Path(r) for r in a.results if r]
    if not roots:
        sys.exit("error: --results: give the samunet_results folder(s) of the study")
    name = dataset_name(a.dataset, roots)
    stem = f"plateau_ensembles_{name[7:10]}_fold{a.fold}"
    work = HERE / "work" / stem
    columns = [run_column(a, name, str(col), roots, work) for col in a.labeled]
    given = argv if argv is not None else sys.argv[1:]
    args = [f"RESULTS/{Path(x).name}" if x in a.results else x for x in given]
    report = {"dataset": name, "fold": a.fold, "max_ensemble_size": a.max_ensemble_size,
              "command": "python benchmarks/plateau_ensembles.py " + " ".join(args),
              "date": time.strftime("%Y-%m-%d"), "columns": columns}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
