"""Models of a label-efficiency column, and their ensembles, on cases that neither chose nor trained them.

``plateau_ensembles.py`` lets find-best choose among single models and ensembles on the fold's validation cases,
the same cases that then report the chosen Dice. With few labelled cases, the fold's other training cases are a
second, independent test set: no model of the column saw their labels, and no choice was made on them. This script
predicts a seeded sample of them with every given samunet model (the fold's checkpoint, mirroring test-time
augmentation exactly as its final validation applies it, the cached embeddings where the cache holds them) and,
optionally, with nnU-Net's model of the same column, then scores every model and every samunet ensemble of 2 to
``--max_ensemble_size`` members (averaged probabilities, as ``samunet_ensemble``).

    M=$STUDY/results/Dataset004_Hippocampus
    python benchmarks/heldout_cases.py -m $M/samunetTrainer_hybrid_n1__samunetPlans__2d \
        $M/samunetTrainer_hybrid_n1__samunetPlans__2.5d_emb $M/samunetTrainer_cnn_n1__samunetPlans__2d \
        --fold 0 --cases 40 --nnunet_fold 5 --suffix _n1 --nnunet_model \
        benchmarks/work/nnunet_results_e119_i50_b16/Dataset004_Hippocampus/nnUNetTrainer_samunetBench__nnUNetPlans__2d

Predictions are kept under ``benchmarks/work/heldout_<id>_fold<K><suffix>/`` and a rerun predicts only what is
missing. nnU-Net runs from its own environment (``setup_nnunet_env.sh``; the study's trainer class installed there by
``label_efficiency.py``). Writes ``benchmarks/results/heldout_<id>_fold<K><suffix>.{json,md}``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from label_efficiency import evaluate as evaluate_cases  # the benchmarks folder is the script's own
from plateau_ensembles import short
from samunet.evaluation.find_best import ensemble_key

HERE = Path(__file__).resolve().parent


def held_out(models: list[Path], fold: int, pp: Path, n: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` of the fold's training cases that no model trained on (nor validated on)."""
    splits = json.loads((pp / "splits_final.json").read_text())[fold]
    seen = set()
    for m in models:
        debug = json.loads((m / f"fold_{fold}" / "debug.json").read_text())
        seen |= set(debug["train_cases"]) | set(debug["val_cases"])
    pool = sorted(set(splits["train"]) - seen)
    if len(pool) < n:
        sys.exit(f"error: {pp / 'splits_final.json'}: only {len(pool)} training cases of fold {fold} are unseen")
    return sorted(np.random.default_rng(seed).choice(pool, n, replace=False).tolist())


def predict_samunet(model: Path, fold: int, cases: list[str], pp: Path, out: Path) -> dict:
    """Predict ``cases`` from their preprocessed arrays with ``model``'s fold; returns timing and TTA."""
    from samunet.inference.predict import EnsemblePredictor
    from samunet.inference.predictor import predict_preprocessed
    from samunet.models.encoders import encoder_identity
    from samunet.preprocessing.embedding_cache import EmbeddingCache
    from samunet.preprocessing.mirrored_views import MirroredViews
    p = EnsemblePredictor(model, folds=[fold], device="cpu")
    cache = None if p.encoder is None else EmbeddingCache(pp, p.configuration, p.config, encoder_identity(p.encoder),
                                                          p.label_values)
    ending = p.plans["file_ending"]
    out.mkdir(parents=True, exist_ok=True)
    t0, done = time.time(), 0
    for case in cases:
        if (out / f"{case}{ending}").is_file() and (out / f"{case}.npz").is_file():
            continue
        data = np.load(pp / p.config["data_identifier"] / f"{case}.npy", mmap_mode="r")
        props = json.loads((pp / p.config["data_identifier"] / f"{case}.json").read_text())
        emb = None
        if cache is not None and cache.is_done(case):
            emb = MirroredViews(cache).embeddings(case, data, p.encoder) if p.tta else cache.load(case)[0]
        probs = predict_preprocessed(data, p.config, p.encoder, p.heads, len(p.label_values), tta=p.tta,
                                     cached_embeddings=emb, batch_size=int(p.config["batch_size"]), device=p.device)
        p.export(probs, props, out / f"{case}{ending}", save_probabilities=True)
        done += 1
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(model / name, out / name)
    return {"mirroring_tta": p.tta, "predicted_now": done, "seconds_now": round(time.time() - t0, 1)}


def predict_nnunet(a, cases: list[str], raw: Path, work: Path) -> dict:
    out, inp = work / "nnunet", work / "nnunet_input"
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    todo = [c for c in cases if not (out / f"{c}{ending}").is_file()]
    t0 = time.time()
    if todo:
        shutil.rmtree(inp, ignore_errors=True)
        inp.mkdir(parents=True)
        for c in todo:
            for f in sorted((raw / "imagesTr").glob(f"{c}_0*{ending}")):
                shutil.copyfile(f, inp / f.name)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cmd = [str(Path(a.nnunet_bin) / "nnUNetv2_predict_from_modelfolder"), "-i", str(inp), "-o", str(out),
               "-m", str(Path(a.nnunet_model).resolve()), "-f", str(a.nnunet_fold), "-device", "cpu",
               "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: {a.nnunet_model}: nnU-Net's prediction failed:\n{r.stderr[-2000:]}")
    shutil.copyfile(raw / "dataset.json", out / "dataset.json")
    return {"mirroring_tta": True, "predicted_now": len(todo), "seconds_now": round(time.time() - t0, 1)}


def evaluate(raw: Path, pred: Path, cases: list[str], out: Path) -> dict:
    """Scores of the predictions of ``cases`` in ``pred`` (label_efficiency's evaluation, which checks the folder
    holds exactly those cases), without the summary's path: the report carries no machine's paths."""
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    scores = evaluate_cases(raw, pred, cases, ending, out)
    return {k: v for k, v in scores.items() if k != "summary"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", nargs="+", required=True, help="samunet model folders (TRAINER__PLANS__CONFIG)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--cases", type=int, default=40, help="how many unseen training cases (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_ensemble_size", type=int, default=3)
    p.add_argument("--nnunet_model", default=None, help="nnU-Net model folder of the same column")
    p.add_argument("--nnunet_fold", default="0", help="its fold (the study's extra folds are 5 and above)")
    p.add_argument("--nnunet_bin", default=str(HERE / ".venv-nnunet" / "bin"))
    p.add_argument("--postprocess", nargs="*", default=[], metavar="KEY=CLASSES",
                   help="also score KEY (a model folder name, an ensemble key or 'nnunet') after keeping the largest "
                        "component of CLASSES (e.g. 1,2), as chosen on the validation cases")
    p.add_argument("--suffix", default="")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    from samunet.paths import preprocessed_folder, raw_folder
    models = [Path(m).resolve() for m in a.m]
    name = models[0].parent.name
    pp, raw = preprocessed_folder() / name, raw_folder() / name
    stem = f"heldout_{name[7:10]}_fold{a.fold}{a.suffix}"
    work = HERE / "work" / stem
    cases = held_out(models, a.fold, pp, a.cases, a.seed)
    runs, scores = {}, {}
    for m in models:
        runs[m.name] = predict_samunet(m, a.fold, cases, pp, work / m.name)
        scores[m.name] = evaluate(raw, work / m.name, cases, work / f"{m.name}.json")
        print(f"{m.name}: {scores[m.name]['mean_foreground_dice']:.4f}", flush=True)
    for size in range(2, min(a.max_ensemble_size, len(models)) + 1):
        for members in itertools.combinations(sorted(m.name for m in models), size):
            key = ensemble_key(members)
            folder = work / key
            subprocess.run([str(Path(sys.executable).parent / "samunet_ensemble"), "-i",
                            *(str(work / m) for m in members), "-o", str(folder)], check=True, capture_output=True)
            scores[key] = evaluate(raw, folder, cases, work / f"{key}.json")
            print(f"{key}: {scores[key]['mean_foreground_dice']:.4f}", flush=True)
    if a.nnunet_model:
        runs["nnunet"] = predict_nnunet(a, cases, raw, work)
        scores["nnunet"] = evaluate(raw, work / "nnunet", cases, work / "nnunet.json")
        print(f"nnunet: {scores['nnunet']['mean_foreground_dice']:.4f}", flush=True)
    for spec in a.postprocess:
        key, _, classes = spec.partition("=")
        if key not in scores:
            sys.exit(f"error: --postprocess {spec}: {key} is none of the scored models ({', '.join(scores)})")
        rule = work / f"{key}_pp.json"
        rule.write_text(json.dumps({"keep_largest_component": [int(c) for c in classes.split(",") if c]}))
        subprocess.run([str(Path(sys.executable).parent / "samunet_apply_postprocessing"), "-i", str(work / key),
                        "-o", str(work / f"{key}_pp"), "-pp_pkl_file", str(rule)], check=True, capture_output=True)
        shown = f"{key} post-processed ({classes})"
        scores[shown] = evaluate(raw, work / f"{key}_pp", cases, work / f"{key}_pp_summary.json")
        print(f"{shown}: {scores[shown]['mean_foreground_dice']:.4f}")
    given = argv if argv is not None else sys.argv[1:]
    shown = [Path(x).name if os.sep in x else x for x in given]  # folder names only: no machine's paths
    report = {"dataset": name, "fold": a.fold, "cases": cases, "seed": a.seed,
              "command": "python benchmarks/heldout_cases.py " + " ".join(shown), "date": time.strftime("%Y-%m-%d"),
              "runs": runs, "scores": scores}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# {len(cases)} unseen training cases of {name} fold {a.fold}", "", f"Command: `{report['command']}`", "",
             "| model | mean foreground Dice | per class |", "| --- | --- | --- |"]
    for key, s in sorted(scores.items(), key=lambda kv: -kv[1]["mean_foreground_dice"]):
        per = " / ".join(f"{v:.4f}" for v in s["dice_per_class"].values())
        model, _, pp = key.partition(" post-processed")
        shown = ("nnU-Net 2d" if model == "nnunet" else short(model)) + (f" post-processed{pp}" if pp else "")
        lines.append(f"| {shown} | {s['mean_foreground_dice']:.4f} | {per} |")
    lines += ["", "No model saw these cases' labels and no choice was made on them; post-processing keeps the largest "
              "component of the classes that each model's own validation chose (`--postprocess`)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
