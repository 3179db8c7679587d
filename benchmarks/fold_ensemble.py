"""Five-fold ensemble against single folds, on cases that no fold trained on.

    python benchmarks/fold_ensemble.py -m MODEL_DIR [--max_cases N]

MODEL_DIR is a trained samunet model folder with several folds (``TRAINER__PLANS__CONFIG``), trained with
``--num_labeled_cases N`` so that some cases were used by no fold for training (read from each fold's
``debug.json``). Every such case is predicted by each fold alone and by the average of all folds' probabilities
(what ``samunet_predict`` does), without mirroring, from the embedding cache that training built (so the encoder
does not run again; ``samunet_predict`` re-encodes the same slices and gives the same result up to float16
rounding of the cache). Predictions are exported to the original geometry and scored with samunet's evaluation
against ``gt_segmentations`` of the preprocessed data set.

Environment: ``samunet_preprocessed`` (and ``samunet_raw``/``samunet_results`` as for training).
Writes benchmarks/results/fold_ensemble.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_speed import _git_commit, _machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", required=True, help="trained samunet model folder with several folds")
    p.add_argument("--max_cases", type=int, default=None, help="at most this many held-out cases (default all)")
    a = p.parse_args(argv)

    import torch
    from samunet.dataset.io import write_seg
    from samunet.evaluation.evaluate import evaluate_folder
    from samunet.inference.predict import EnsemblePredictor
    from samunet.inference.predictor import predict_preprocessed, probabilities_to_segmentation
    from samunet.models.encoders import encoder_identity
    from samunet.paths import preprocessed_folder
    from samunet.preprocessing.embedding_cache import EmbeddingCache
    from samunet.utils import load_json

    model_dir = Path(a.m).resolve()
    ens = EnsemblePredictor(model_dir, device="cpu", tta=False)
    dataset = load_json(model_dir / "dataset.json")
    plans = ens.plans
    dataset_name = plans["dataset_name"]
    pp = preprocessed_folder() / dataset_name
    trained_on = set()
    for f in ens.folds:
        trained_on |= set(load_json(model_dir / f"fold_{f}" / "debug.json")["train_cases"])
    ids = load_json(pp / "dataset_fingerprint.json")["case_identifiers"]
    held_out = [c for c in ids if c not in trained_on][: a.max_cases]
    if not held_out:
        raise SystemExit(f"error: every case trained some fold of {model_dir.name}; nothing is held out")
    cache = EmbeddingCache(pp, ens.configuration, ens.config, encoder_identity(ens.encoder), ens.label_values)
    missing = cache.missing(held_out)
    if missing:
        raise SystemExit(f"error: {len(missing)} held-out case(s) have no cached embeddings (e.g. {missing[0]})")
    data_dir = pp / ens.config["data_identifier"]
    ending = plans["file_ending"]
    labels = [v for v in ens.label_values if v != 0]
    k = len(ens.label_values)
    names = [f"fold_{f}" for f in ens.folds] + ["ensemble"]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="samunet_fold_ensemble_") as tmp:
        out = {n: Path(tmp) / n for n in names}
        for d in out.values():
            d.mkdir()
        torch.set_grad_enabled(False)
        for i, ident in enumerate(held_out):
            data = np.load(data_dir / f"{ident}.npy", mmap_mode="r")
            props = load_json(data_dir / f"{ident}.json")
            emb = cache.load(ident)[0]
            total = None
            for f, head in zip(ens.folds, ens.heads):
                probs = predict_preprocessed(data, ens.config, ens.encoder, [head], k, tta=False,
                                             cached_embeddings=emb, batch_size=16, device="cpu")
                total = probs if total is None else total + probs
                seg, _ = probabilities_to_segmentation(probs, props, ens.label_values)
                write_seg(seg, props["original"], out[f"fold_{f}"] / f"{ident}{ending}")
            seg, _ = probabilities_to_segmentation(total / len(ens.heads), props, ens.label_values)
            write_seg(seg, props["original"], out["ensemble"] / f"{ident}{ending}")
            print(f"\r{i + 1}/{len(held_out)} cases", end="", flush=True)
        print()
        summaries = {n: evaluate_folder(pp / "gt_segmentations", out[n], labels, ending, cases=held_out)
                     for n in names}
    seconds = time.time() - t0
    def case_dice(summary: dict) -> dict:
        out = {}
        for entry in summary["metric_per_case"]:
            case = Path(entry["prediction_file"]).name[: -len(ending)]
            out[case] = float(np.nanmean([entry["metrics"][str(v)]["Dice"] for v in labels]))
        return out

    per_case = {n: case_dice(summaries[n]) for n in names}
    fold_names = names[:-1]
    fold_mean_per_case = {c: float(np.mean([per_case[n][c] for n in fold_names])) for c in held_out}
    diffs = np.array([per_case["ensemble"][c] - fold_mean_per_case[c] for c in held_out])
    rows = {n: {"foreground_dice": round(summaries[n]["foreground_mean"]["Dice"], 4),
                "per_class": {kk: round(v["Dice"], 4) for kk, v in summaries[n]["mean"].items()},
                "hd95_mm": round(float(np.nanmean([v["HD95"] for v in summaries[n]["mean"].values()])), 3)}
            for n in names}
    single = [rows[n]["foreground_dice"] for n in fold_names]
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
              "commit": _git_commit(), "command": "python benchmarks/fold_ensemble.py -m " + model_dir.name,
              "dataset": dataset_name, "model": model_dir.name, "folds": ens.folds,
              "labels": dataset["labels"], "held_out_cases": held_out, "rows": rows,
              "single_fold_mean": round(float(np.mean(single)), 4),
              "single_fold_range": [min(single), max(single)],
              "ensemble_minus_fold_mean_per_case": {"mean": round(float(diffs.mean()), 4),
                                                     "cases_better": int((diffs > 0).sum()),
                                                     "cases_worse": int((diffs < 0).sum())},
              "seconds": round(seconds, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fold_ensemble.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "fold_ensemble.md").write_text(_markdown(result))
    print((RESULTS / "fold_ensemble.md").read_text())


def _markdown(r: dict) -> str:
    lines = [f"# Fold ensemble vs single folds: {r['dataset']}", "",
             f"`{r['command']}` — {r['date']}, commit {r['commit']}.", "",
             f"Model `{r['model']}`, folds {', '.join(r['folds'])}; {len(r['held_out_cases'])} cases that no fold "
             "trained on, no mirroring, from the embedding cache.", "",
             "| prediction | Dice (fg mean) | Dice per class | HD95 (mm, class mean) |", "|---|---|---|---|"]
    for n, x in r["rows"].items():
        per = ", ".join(f"{k}: {v:.4f}" for k, v in x["per_class"].items())
        lines.append(f"| {n} | {x['foreground_dice']:.4f} | {per} | {x['hd95_mm']:.3f} |")
    d = r["ensemble_minus_fold_mean_per_case"]
    lines += ["", f"Single folds: mean {r['single_fold_mean']:.4f}, range {r['single_fold_range'][0]:.4f}-"
                  f"{r['single_fold_range'][1]:.4f}. Ensemble minus the mean of the single folds, per case: "
                  f"{d['mean']:+.4f} on average, better on {d['cases_better']} cases, worse on {d['cases_worse']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
