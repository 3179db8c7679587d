"""Label efficiency: frozen-encoder heads against networks trained from scratch, for growing numbers of labels.

For one data set and one cross-validation fold, every method is trained on nested, seeded subsets of the fold's
training cases (``--labeled 1 2 5 10 all``; the subsets come from ``samunet.training.splits.labeled_subset``, the
same function ``samunet_train --num_labeled_cases`` uses) and evaluated on the fold's full validation set:

- samunet heads on the frozen encoder (``--heads autosam cnn linear``), trained on cached embeddings;
- ``unet``: nnU-Net's 2D U-Net topology (dynamic-network-architectures ``PlainConvUNet``) trained from scratch
  inside samunet (``samunet_train ... --head unet``) on augmented slices on the hybrid head's canvas (the hybrid
  head without the frozen embedding), with the same sampling, training loop and final validation;
- ``unet_ssl``: the same U-Net, first pre-trained self-supervised on every training slice of the fold with labels
  unused (``samunet_pretrain``, masked image modelling; once per fold, shared by every column), then fine-tuned on
  the labelled subset (``samunet_train ... --head unet --pretrained_weights``); its pre-training time is reported
  beside its fine-tuning time;
- nnU-Net v2 itself (``2d`` configuration), run from its own virtual environment with a custom
  ``splits_final.json`` that gives it exactly the same training and validation cases, and a small trainer variant
  whose epoch budget comes from environment variables.

Every method is scored the same way: its validation predictions in the original geometry are evaluated with
``samunet_evaluate_folder`` against the raw ``labelsTr``. For samunet models these are the files the final
validation of ``samunet_train`` writes (``fold_K/validation``), predicted by the same ``predict_preprocessed``
code as ``samunet_predict`` (with mirroring only for models trained with mirroring, as ``samunet_predict``), the
heads reading the cached embeddings instead of re-encoding
every slice; ``--crosscheck_predict`` re-predicts one cell with ``samunet_predict`` to show both agree.

The run is resumable: finished cells are skipped, interrupted ones are continued (``--c``). A cell that the
results file records but whose work folder is not on this machine (trained elsewhere) is kept as recorded, neither
trained again nor dropped from the report (``--retrain`` trains it again); an nnU-Net plateau cell shorter than
its column's longest samunet cell is trained again regardless. Results go to
``benchmarks/results/label_efficiency_<dataset>_fold<K>[_quick|_plateau][<suffix>].{json,md,png}``.

Environment: ``samunet_raw`` (the raw data set must also be in nnU-Net's raw format, which samunet's is),
``samunet_preprocessed`` (planned and preprocessed, embedding cache built for the heads) and ``samunet_results``
(where the samunet models of the study go; use a folder of its own).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from samunet.models.specs import ENCODER_HEADS, HEADS  # noqa: E402  (light: no torch)

NNUNET_TRAINER = "nnUNetTrainer_samunetBench"
NNUNET_TRAINER_SOURCE = '''"""Written by samunet's benchmarks/label_efficiency.py: nnUNetTrainer with its training length (and, optionally,
batch size) taken from environment variables, so a benchmark can state and fix the budget; it writes
checkpoint_latest every 5 epochs (nnU-Net: 50), so that a study interrupted on a CPU loses little when resumed."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_samunetBench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("SAMUNET_BENCH_EPOCHS", self.num_epochs))
        self.num_iterations_per_epoch = int(os.environ.get("SAMUNET_BENCH_ITERATIONS",
                                                           self.num_iterations_per_epoch))
        self.num_val_iterations_per_epoch = int(os.environ.get("SAMUNET_BENCH_VAL_ITERATIONS",
                                                               self.num_val_iterations_per_epoch))
        self.save_every = int(os.environ.get("SAMUNET_BENCH_SAVE_EVERY", 5))
        if os.environ.get("SAMUNET_BENCH_THREADS"):  # nnU-Net's CPU entry point takes every core; a study may pin it
            torch.set_num_threads(int(os.environ["SAMUNET_BENCH_THREADS"]))
        batch = os.environ.get("SAMUNET_BENCH_BATCH_SIZE")
        if batch:
            self.configuration_manager.configuration["batch_size"] = int(batch)
'''

QUICK = {"labeled": ["1", "5", "all"], "models": ["autosam", "cnn", "unet"],
         "heads": {"epochs": 4, "iterations": 20, "batch_size": 16},
         "unet": {"epochs": 4, "iterations": 20, "batch_size": 16},
         "nnunet": {"epochs": 4, "iterations": 20, "val_iterations": 2, "batch_size": 16}}


# ----------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def console(name: str) -> list[str]:
    """A samunet console script of the running interpreter's environment."""
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    module, func = {"samunet_train": ("samunet.cli", "train_entry"),
                    "samunet_pretrain": ("samunet.cli", "pretrain_entry"),
                    "samunet_predict": ("samunet.cli", "predict_entry"),
                    "samunet_evaluate_folder": ("samunet.evaluation.cli", "evaluate_folder_entry")}[name]
    return [sys.executable, "-c", f"from {module} import {func} as m; m()"]


def run(cmd: list[str], env: dict | None = None, log_file: Path | None = None) -> float:
    """Run a command (output to ``log_file`` if given); return its wall time; raise on failure."""
    log("$ " + " ".join(cmd))
    t0 = time.time()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as fh:
            r = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    else:
        r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"command failed (exit {r.returncode}): {' '.join(cmd)}"
                         + (f"\n  see {log_file}" if log_file else ""))
    return time.time() - t0


def portable(report: dict) -> dict:
    """The report with this machine's folders written as $samunet_results, $samunet_preprocessed, $samunet_raw or
    relative to the repository, so a committed result names no local path."""
    roots = [(os.path.realpath(os.environ[v]), f"${v}")
             for v in ("samunet_results", "samunet_preprocessed", "samunet_raw") if os.environ.get(v)]
    roots = sorted(roots + [(str(REPO), ".")], key=lambda r: -len(r[0]))

    def convert(obj):
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [convert(v) for v in obj]
        if isinstance(obj, str) and obj.startswith("/"):
            for path in (os.path.normpath(obj), os.path.realpath(obj)):  # as written, then with links resolved
                for root, name in roots:
                    if path == root or path.startswith(root + os.sep):
                        return name + path[len(root):]
        return obj
    return convert(report)


def load_json(path: Path):
    return json.loads(Path(path).read_text())


def save_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def predictions_complete(folder: Path, cases: list[str], ending: str) -> bool:
    return folder.is_dir() and all((folder / f"{c}{ending}").is_file() for c in cases)


def evaluate(raw: Path, pred: Path, cases: list[str], ending: str, out: Path) -> dict:
    """``samunet_evaluate_folder`` against the raw labels, restricted to (and checked to cover) ``cases``."""
    present = sorted(p.name[: -len(ending)] for p in pred.glob(f"*{ending}"))
    if present != sorted(cases):
        raise SystemExit(f"{pred}: predictions {len(present)} case(s) do not match the {len(cases)} validation cases")
    newest = max(p.stat().st_mtime for p in pred.glob(f"*{ending}"))
    if not out.is_file() or out.stat().st_mtime < newest:  # evaluated once per set of predictions
        _evaluate(raw, pred, out)
    s = load_json(out)
    n = len(s["metric_per_case"])
    if n != len(cases):
        raise SystemExit(f"{out}: {n} cases evaluated, expected {len(cases)}")
    return {"mean_foreground_dice": s["foreground_mean"]["Dice"],
            "dice_per_class": {k: v["Dice"] for k, v in s["mean"].items()}, "num_cases": n, "summary": str(out)}


def _evaluate(raw: Path, pred: Path, out: Path) -> None:
    # --chill: the raw labelsTr holds every case, the prediction folder only the validation cases (checked above)
    run(console("samunet_evaluate_folder") + [str(raw / "labelsTr"), str(pred), "-djfile", str(raw / "dataset.json"),
                                              "-o", str(out), "--chill"])


def run_logs(folder: Path) -> list[Path]:
    """nnU-Net's text logs of the run that produced the final model: the last one that started at epoch 0 and the
    continuations (``--c``) after it; the logs of an abandoned earlier start in the same folder are left out."""
    logs = sorted(folder.glob("training_log_*.txt"), key=lambda f: f.stat().st_mtime)
    starts = [i for i, f in enumerate(logs) if (m := re.search(r"Epoch (\d+)", f.read_text(errors="replace")))
              and m.group(1) == "0"]
    return logs[starts[-1]:] if starts else logs


# ----------------------------------------------------------------------------------------------- samunet cells
SSL = "unet_ssl"  # the U-Net pre-trained by samunet_pretrain, then fine-tuned
ST = "hybrid_st"  # the hybrid head's self-training student (samunet_train --self_training), after its teacher


def split_method(method: str) -> tuple[str, str]:
    """'hybrid:2.5d_emb' -> ('hybrid', '2.5d_emb'); 'autosam' -> ('autosam', '2d')."""
    head, _, config = method.partition(":")
    if head not in HEADS and head not in (SSL, ST):
        raise SystemExit(f"unknown samunet model '{head}' in '{method}' (choose {', '.join(HEADS + (SSL, ST))})")
    return head, config or "2d"


def pretrain_cell(a, config: str, budget: dict, work: Path) -> dict:
    """``samunet_pretrain`` for the fold (once; resumed if interrupted): its checkpoint and time."""
    from samunet.models.run_checkpoint import load_checkpoint
    from samunet.training.pretrain import PRETRAINER
    from samunet.paths import model_folder
    out = model_folder(a.dataset_name, PRETRAINER, "samunetPlans", config) / f"fold_{a.fold}"
    final = out / "checkpoint_final.pth"
    cell_file = work / "cells" / f"pretrain_{config}.json"
    cell = load_json(cell_file) if cell_file.is_file() else {"wall_s": 0.0}
    if not final.is_file():
        if a.report_only:
            return None
        cmd = console("samunet_pretrain") + [str(a.dataset), config, str(a.fold), "--epochs", str(budget["epochs"]),
                                             "--iterations_per_epoch", str(budget["iterations"]), "--batch_size",
                                             str(budget["batch_size"]), "--device", a.device]
        resume = (out / "checkpoint_latest.pth").is_file()
        cell["wall_s"] += run(cmd + (["--c"] if resume else []), log_file=work / "logs" / f"pretrain_{config}.log")
        save_json(cell, cell_file)
    state = load_checkpoint(final)
    if (int(state["epoch"]), int(state["iterations_per_epoch"]), int(state["batch_size"])) != \
            (budget["epochs"], budget["iterations"], budget["batch_size"]):
        raise SystemExit(f"{final}: pre-trained with another budget ({state['epoch']} x "
                         f"{state['iterations_per_epoch']} x batch {state['batch_size']}); use another samunet_results")
    return {"checkpoint": final, "method": state["pretraining"], "epochs": int(state["epoch"]),
            "iterations_per_epoch": int(state["iterations_per_epoch"]), "batch_size": int(state["batch_size"]),
            "training_time_s": round(float(sum(state["log"]["epoch_time"])), 1),
            "cell_wall_s": round(cell["wall_s"], 1),
            "final_masked_r2": round(float(state["log"]["pseudo_dice"][-1]), 4)}


def local_path(path: str | None) -> Path | None:
    """A path of the report (``$samunet_results/...`` or relative to the repository) on this machine."""
    if not path:
        return None
    for v in ("samunet_results", "samunet_preprocessed", "samunet_raw"):
        if path.startswith(f"${v}/") or path == f"${v}":
            return Path(os.environ[v] + path[len(v) + 1:]) if os.environ.get(v) else None
    return REPO / path if path.startswith(".") else Path(path)


def postprocessed(cell: dict, key: str, raw: Path, val: list[str], ending: str, work: Path) -> dict | None:
    """nnU-Net's keep-largest-component choice (``choose_postprocessing``, as find-best makes it) on a cell's
    validation predictions, or None where they are not on this machine or are not the ones the cell was scored on
    (their Dice differs from the cell's)."""
    from samunet.evaluation.ensemble_postprocess import choose_postprocessing
    folder = local_path(cell.get("model_folder"))
    pred = folder / "validation" if folder else None
    if pred is None or not predictions_complete(pred, val, ending):
        return None
    out = work / "postprocessing" / key
    newest = max((pred / f"{c}{ending}").stat().st_mtime for c in val)
    if (out / "choice.json").is_file() and (out / "choice.json").stat().st_mtime >= newest:
        choice = load_json(out / "choice.json")
    else:
        labels = [v for v in load_json(raw / "dataset.json")["labels"].values() if v != 0]
        choice = choose_postprocessing(pred, raw / "labelsTr", labels, ending, out / "trials", cases=val)
        save_json(choice, out / "choice.json")
    if abs(choice["mean_foreground_dice_before"] - cell["mean_foreground_dice"]) > 1e-6:
        log(f"{key}: the predictions in {pred} score {choice['mean_foreground_dice_before']:.4f}, not the recorded "
            f"{cell['mean_foreground_dice']:.4f}; no post-processing figure")
        return None
    return {k: choice[k] for k in ("keep_largest_component", "mean_foreground_dice", "dice_per_class", "trials")}


def samunet_cell(a, method: str, n: str, expected_train: list[str], val: list[str], budget: dict, ending: str,
                 raw: Path, work: Path, pretrained: dict | None = None) -> dict:
    from samunet.models.run_checkpoint import load_checkpoint
    from samunet.paths import model_folder, trainer_name
    head, config = split_method(method)
    student = head == ST
    if head in (SSL, ST):
        head = "unet" if head == SSL else "hybrid"
    num = None if n == "all" else int(n)
    out = model_folder(a.dataset_name, trainer_name(head, num, pretrained is not None, student), "samunetPlans",
                       config) / f"fold_{a.fold}"
    final = out / "checkpoint_final.pth"
    cell_file = work / "cells" / f"{method}_n{n}.json"
    cell = load_json(cell_file) if cell_file.is_file() else {"wall_s": 0.0}
    cmd = console("samunet_train") + [str(a.dataset), config, str(a.fold), "--head", head, "--epochs",
                                      str(budget["epochs"]), "--iterations_per_epoch", str(budget["iterations"]),
                                      "--batch_size", str(budget["batch_size"]), "--device", a.device,
                                      "--patience", str(budget.get("patience", 0)),
                                      "--npz"]  # validation probabilities: plateau_ensembles.py ensembles the cells
    if num is not None:
        cmd += ["--num_labeled_cases", str(num)]
    if student:
        cmd += ["--self_training"] + (["--pseudo_label_tta"] if a.pseudo_label_tta else [])
    if pretrained is not None:
        cmd += ["--pretrained_weights", str(pretrained["checkpoint"])]
    if a.augmented_views is not None and head == "hybrid":
        cmd += ["--augmented_views", str(a.augmented_views)]
    if head == "hybrid":  # every hybrid cell validates with mirroring on the same cases: their mirrored views once
        cmd += ["--cache_tta_views"]
    logf = work / "logs" / f"{method}_n{n}.log"
    if a.report_only and not (final.is_file() and predictions_complete(out / "validation", val, ending)):
        log(f"{head} n={n}: not finished; left out of the report (--report_only)")
        return None
    if not final.is_file():
        resume = (out / "checkpoint_latest.pth").is_file()
        cell["wall_s"] += run(cmd + (["--c"] if resume else []), log_file=logf)
    elif not predictions_complete(out / "validation", val, ending):
        cell["wall_s"] += run(cmd + ["--val"], log_file=logf)
    else:
        log(f"{head} n={n}: already trained and validated")
    save_json(cell, cell_file)
    debug = load_json(out / "debug.json")
    if sorted(debug["train_cases"]) != sorted(expected_train) or sorted(debug["val_cases"]) != sorted(val):
        raise SystemExit(f"{out}: trained on other cases than the study expects (stale folder?)")
    state = load_checkpoint(final)
    stopped = state["log"].get("stopped_early_after_epoch")
    if (int(state["num_epochs"]), int(state["iterations_per_epoch"]), int(state["batch_size"])) != \
            (budget["epochs"], budget["iterations"], budget["batch_size"]) or \
            (stopped is None and int(state["epoch"]) != budget["epochs"]) or (stopped and not budget.get("patience")):
        raise SystemExit(f"{final}: trained with another budget ({state['epoch']} of {state['num_epochs']} epochs x "
                         f"{state['iterations_per_epoch']} x batch {state['batch_size']}); use another samunet_results")
    result = evaluate(raw, out / "validation", val, ending, work / "eval" / f"{method}_n{n}.json")
    return {**result, "method": method, "head": head, "configuration": config, "labeled": n,
            "num_train_cases": len(expected_train),
            "train_cases": expected_train, "epochs": budget["epochs"], "iterations_per_epoch": budget["iterations"],
            "batch_size": budget["batch_size"], "epochs_done": int(state["epoch"]),
            "iterations_done": int(state["epoch"]) * budget["iterations"], "stopped_early": stopped is not None,
            "early_stopping_patience": budget.get("patience", 0),
            **({"augmented_views": debug["augmented_views"]} if "augmented_views" in debug else {}),
            "training_time_s": round(float(sum(state["log"]["epoch_time"])), 1),
            "training_time_note": "sum of samunet's epoch times (training iterations plus the per-epoch pseudo-Dice "
                                  "check), from the checkpoint",
            "cell_wall_s": round(cell["wall_s"], 1), **({"cell_note": cell["note"]} if "note" in cell else {}),
            **({"pretraining": {k: str(v) if k == "checkpoint" else v for k, v in pretrained.items()},
                "pretraining_time_s": pretrained["training_time_s"]} if pretrained else {}),
            "model_folder": str(out)}


# ----------------------------------------------------------------------------------------------- nnU-Net cells
class NnUNet:
    def __init__(self, a, work: Path, budget: dict):
        bin_dir = Path(a.nnunet_bin) if a.nnunet_bin else HERE / ".venv-nnunet" / "bin"
        self.bin = bin_dir
        if not a.report_only and not (bin_dir / "nnUNetv2_train").is_file():  # a report runs none of its commands
            raise SystemExit(f"nnU-Net not found in {bin_dir} (run benchmarks/setup_nnunet_env.sh, pass --nnunet_bin, "
                             "or use --no_nnunet)")
        self.budget = budget
        self.pp = work.parent / "nnunet_preprocessed"  # shared by every budget: preprocessing does not depend on it
        tag = f"e{budget['epochs']}_i{budget['iterations']}_b{budget['batch_size'] or 'plan'}"
        self.results = work.parent / f"nnunet_results_{tag}"
        self.env = {**os.environ, "nnUNet_raw": str(a.raw.parent), "nnUNet_preprocessed": str(self.pp),
                    "nnUNet_results": str(self.results), "nnUNet_compile": "f",
                    "nnUNet_n_proc_DA": str(a.nnunet_da_processes), "nnUNet_def_n_proc": "2",
                    "SAMUNET_BENCH_EPOCHS": str(budget["epochs"]),
                    "SAMUNET_BENCH_ITERATIONS": str(budget["iterations"]),
                    "SAMUNET_BENCH_VAL_ITERATIONS": str(budget["val_iterations"])}
        if budget["batch_size"]:
            self.env["SAMUNET_BENCH_BATCH_SIZE"] = str(budget["batch_size"])
        if a.nnunet_threads:
            self.env["SAMUNET_BENCH_THREADS"] = str(a.nnunet_threads)
        self.env.pop("PYTHONPATH", None)  # nnU-Net runs in its own environment, never with samunet on the path
        self.a = a
        self.work = work
        self.times = {}

    def python(self) -> str:
        return str(self.bin / "python")

    def install_trainer(self) -> str:
        site = subprocess.run([self.python(), "-c", "import os, nnunetv2; print(os.path.dirname(nnunetv2.__file__))"],
                              capture_output=True, text=True, env=self.env, check=True).stdout.strip()
        target = Path(site) / "training" / "nnUNetTrainer" / "variants" / f"{NNUNET_TRAINER}.py"
        if not target.is_file() or target.read_text() != NNUNET_TRAINER_SOURCE:
            target.write_text(NNUNET_TRAINER_SOURCE)
            log(f"installed {NNUNET_TRAINER} into the nnU-Net environment")
        return str(target)

    def preprocess(self) -> None:
        folder = self.pp / self.a.dataset_name
        marker = folder / ".samunet_bench_preprocessed"
        if marker.is_file():
            return
        env = {**self.env, "nnUNet_n_proc_DA": "2"}  # its planner sets torch's thread count from this (needs >= 1)
        t = run([str(self.bin / "nnUNetv2_plan_and_preprocess"), "-d", str(self.a.dataset), "-c", "2d",
                 "-np", "2", "-npfp", "2"], env=env, log_file=self.work / "logs" / "nnunet_preprocess.log")
        save_json({"wall_s": round(t, 1)}, marker)

    def preprocess_time(self) -> float | None:
        marker = self.pp / self.a.dataset_name / ".samunet_bench_preprocessed"
        return load_json(marker)["wall_s"] if marker.is_file() else None

    def split_index(self, samunet_splits: list[dict], fold: int, train: list[str], val: list[str]) -> int:
        """Index of the nnU-Net fold with exactly these cases; samunet's folds come first (0-4), subsets after."""
        path = self.pp / self.a.dataset_name / "splits_final.json"
        splits = load_json(path) if path.is_file() else [{"train": sorted(s["train"]), "val": sorted(s["val"])}
                                                          for s in samunet_splits]
        for k in range(len(samunet_splits)):
            if sorted(splits[k]["train"]) != sorted(samunet_splits[k]["train"]) or \
                    sorted(splits[k]["val"]) != sorted(samunet_splits[k]["val"]):
                raise SystemExit(f"{path}: fold {k} differs from samunet's split; remove it to let the benchmark "
                                 "write samunet's folds")
        want = {"train": sorted(train), "val": sorted(val)}
        for i, s in enumerate(splits):
            if {"train": sorted(s["train"]), "val": sorted(s["val"])} == want:
                idx = i
                break
        else:
            splits.append(want)
            idx = len(splits) - 1
        save_json(splits, path)
        return idx

    def longest_finished(self, idx: int, val: list[str], ending: str) -> int | None:
        """Epochs of the longest finished, validated nnU-Net run of this split under another epoch budget."""
        epochs = []
        for folder in self.results.parent.glob(f"nnunet_results_e*_i{self.budget['iterations']}_b"
                                               f"{self.budget['batch_size'] or 'plan'}"):
            out = folder / self.a.dataset_name / f"{NNUNET_TRAINER}__nnUNetPlans__2d" / f"fold_{idx}"
            e = int(folder.name.split("_")[2][1:])
            if (out / "checkpoint_final.pth").is_file() and predictions_complete(out / "validation", val, ending):
                epochs.append(e)
        return max(epochs) if epochs else None

    def cell(self, n: str, idx: int, train: list[str], val: list[str], ending: str, raw: Path,
             name: str | None = None) -> dict:
        """Train (or resume, or only validate) nnU-Net on fold ``idx`` under this budget and score it; ``name``
        (default ``nnunet_n<n>``) names its wall-time record, logs and evaluation."""
        name = name or f"nnunet_n{n}"
        out = self.results / self.a.dataset_name / f"{NNUNET_TRAINER}__nnUNetPlans__2d" / f"fold_{idx}"
        cell_file = self.work / "cells" / f"{name}.json"
        cell = load_json(cell_file) if cell_file.is_file() else {"wall_s": 0.0}
        cmd = [str(self.bin / "nnUNetv2_train"), str(self.a.dataset), "2d", str(idx), "-tr", NNUNET_TRAINER,
               "-device", "cpu" if self.a.device == "cpu" else "cuda"]
        logf = self.work / "logs" / f"{name}.log"
        if self.a.report_only and not ((out / "checkpoint_final.pth").is_file()
                                       and predictions_complete(out / "validation", val, ending)):
            log(f"nnunet n={n}: not finished; left out of the report (--report_only)")
            return None
        if not (out / "checkpoint_final.pth").is_file():
            resume = (out / "checkpoint_latest.pth").is_file()
            cell["wall_s"] += run(cmd + (["--c"] if resume else []), env=self.env, log_file=logf)
        elif not predictions_complete(out / "validation", val, ending):
            cell["wall_s"] += run(cmd + ["--val"], env=self.env, log_file=logf)
        else:
            log(f"nnunet n={n}: already trained and validated")
        save_json(cell, cell_file)
        result = evaluate(raw, out / "validation", val, ending, self.work / "eval" / f"{name}.json")
        text = "".join(f.read_text(errors="replace") for f in run_logs(out))
        epoch_times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", text)]
        train_time = sum(epoch_times) if epoch_times else None
        epochs_done = len(epoch_times)
        plans = load_json(self.pp / self.a.dataset_name / "nnUNetPlans.json")["configurations"]["2d"]
        epochs_text = re.split(r"Epoch time:", text)
        best_epochs = [i for i, chunk in enumerate(epochs_text[1:], 1) if "New best EMA pseudo Dice" in chunk]
        last_best = best_epochs[-1] if best_epochs else 0
        return {"still_rising": bool(epochs_done and last_best > 0.8 * epochs_done),
                "last_new_best_epoch": last_best, "iterations_done": epochs_done * self.budget["iterations"],
**result, "method": "nnunet", "labeled": n, "num_train_cases": len(train), "train_cases": train,
                "nnunet_fold": idx, "epochs": self.budget["epochs"], "epochs_logged": epochs_done,
                "iterations_per_epoch": self.budget["iterations"],
                "val_iterations_per_epoch": self.budget["val_iterations"],
                "batch_size": self.budget["batch_size"] or plans["batch_size"],
                "nnunet_plan_batch_size": plans["batch_size"], "patch_size": plans["patch_size"],
                "training_time_s": round(train_time, 1) if train_time is not None else None,
                "training_time_note": "sum of nnU-Net's logged epoch times",
                "cell_wall_s": round(cell["wall_s"], 1), "model_folder": str(out)}


def nnunet_owes(recorded: dict, longest: int, extensions: int) -> bool:
    """Whether a recorded nnU-Net plateau cell must be trained (again): fewer iterations than its column's longest
    samunet cell, or still rising with an extension of 25% more epochs not yet run."""
    if recorded.get("iterations_done", 0) < longest:
        return True
    return bool(recorded.get("still_rising")) and len(recorded.get("shorter_runs", [])) < extensions


# ----------------------------------------------------------------------------------------------- reports
LABELS = {"autosam": "samunet autosam (frozen encoder)", "cnn": "samunet cnn (frozen encoder)",
          "hybrid:2.5d_emb": "samunet hybrid, embeddings of slices s-1, s, s+1 (2.5d_emb)",
          "autosam:2.5d": "samunet autosam, slices s-1, s, s+1 as the encoder's RGB (2.5d)",
          "hybrid": "samunet hybrid (frozen encoder + image U-Net)",
          ST: "samunet hybrid, self-trained on the teacher's labels of the unlabelled training cases",
          "linear": "samunet linear (frozen encoder)", "unet": "2D U-Net from scratch (in samunet)",
          SSL: "2D U-Net, self-supervised pre-training then fine-tuning (in samunet)",
          "nnunet": "nnU-Net v2 2d"}


def fmt_time(s) -> str:
    if s is None:
        return "?"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def markdown(report: dict) -> str:
    cells = report["cells"]
    settings = report["settings"]["labeled"]
    n_train = report["settings"]["num_train_cases_by_setting"]
    classes = report["class_names"]
    head = "| method | " + " | ".join(f"{s} ({n_train[s]} cases)" if s == "all" else f"{s} labelled"
                                      for s in settings) + " |"
    lines = [head, "|---|" + "---|" * len(settings)]
    for m in report["settings"]["methods"]:
        row = [LABELS.get(m, m) + (", labels with mirroring TTA" if m == ST and
                                   report["budgets"]["heads"].get("pseudo_label_tta") else "")]
        for s in settings:
            c = cells.get(f"{m}_n{s}")
            if c is None:
                row.append("—")
                continue
            per = " / ".join(f"{c['dice_per_class'][k]:.3f}" for k in sorted(c["dice_per_class"], key=int))
            its = f", {c['iterations_done']} it" if report.get("plateau") and c.get("iterations_done") else ""
            rising = " (still rising)" if c.get("still_rising") else ""
            if report.get("plateau") and c.get("stopped_early") is False and c.get("epochs_done") == c.get("epochs"):
                rising = " (at the epoch cap: no plateau within it)"
            for r in c.get("shorter_runs", []):
                rising += f" (shorter run, {r['iterations_done']} it: {r['mean_foreground_dice']:.3f}, still rising)"
            if c.get("longer_run_unfinished_iterations"):
                rising += f" (its longer run, {c['longer_run_unfinished_iterations']} it, not yet trained)"
            if c.get("fewer_iterations_than_longest_samunet_cell"):
                rising += (" (fewer than the column's longest samunet cell, "
                           f"{c['fewer_iterations_than_longest_samunet_cell']} it)")
            pre = f" + {fmt_time(c['pretraining_time_s'])} pre-training" if "pretraining_time_s" in c else ""
            row.append(f"**{c['mean_foreground_dice']:.3f}** ({per}), {fmt_time(c['training_time_s'])}{pre}{its}"
                       f"{rising}")
        lines.append("| " + " | ".join(row) + " |")
    pp_lines = postprocessed_table(report)
    b = budgets_in_study(report)
    kind = " (quick)" if report["quick"] else " (trained to plateau)" if report.get("plateau") else ""
    text = [f"# Label efficiency: {report['dataset']} fold {report['fold']}{kind}",
            "",
            f"Mean foreground Dice on the fold's {report['num_val_cases']} validation cases, per class in brackets "
            f"({' / '.join(classes)}), then training time. Every cell is evaluated with `samunet_evaluate_folder` "
            "against the raw `labelsTr`.",
            "", *lines, "", *pp_lines,
            "Budgets (epochs x iterations x batch):"]
    cap = "at most " if report.get("plateau") else ""
    stop = lambda k: (f", stopped early once the moving-average pseudo-Dice had not improved for "  # noqa: E731
                      f"{b[k]['patience']} epochs ('at the epoch cap' marks a cell that never stopped early)") \
        if b[k].get("patience") else ""
    if "heads" in b:
        text.append(f"- heads: {cap}{b['heads']['epochs']} x {b['heads']['iterations']} x {b['heads']['batch_size']} "
                    f"on cached embeddings of the frozen encoder{stop('heads')}")
    if "unet" in b:
        text.append(f"- U-Net from scratch: {cap}{b['unet']['epochs']} x {b['unet']['iterations']} x "
                    f"{b['unet']['batch_size']} on augmented slices on its canvas (same sampling and loop as the "
                    f"heads){stop('unet')}"
                    + (f"; {SSL} first pre-trained for {b['pretrain']['epochs']} x {b['pretrain']['iterations']} x "
                       f"{b['pretrain']['batch_size']} (masked image modelling, every training slice of the fold, "
                       "labels unused), then fine-tuned with the same budget" if "pretrain" in b else ""))
    if "nnunet" in b and report.get("plateau"):
        text.append(f"- nnU-Net: per column, at least as many iterations as the longest samunet cell of that column "
                    f"(epochs of {b['nnunet']['iterations']} iterations x batch {b['nnunet']['batch_size']}, "
                    f"{b['nnunet']['val_iterations']} validation iterations per epoch, {NNUNET_TRAINER}); its own 2d "
                    "plans, preprocessing and augmentation; '(still rising)' marks a cell whose own moving-average "
                    "pseudo-Dice set a new best in its last fifth of epochs; "
                    + ("such a cell is not trained longer here (--nnunet_extensions 0)"
                       if b["nnunet"].get("extensions", 1) == 0 else
                       "such a cell is trained again from scratch with 25% more epochs (the shorter run's Dice shown "
                       "after it)"))
    elif "nnunet" in b:
        text.append(f"- nnU-Net: {b['nnunet']['epochs']} x {b['nnunet']['iterations']} x "
                    f"{b['nnunet']['batch_size'] or 'plan'} ({NNUNET_TRAINER}, {b['nnunet']['val_iterations']} "
                    "validation iterations per epoch), its own 2d plans, preprocessing and augmentation")
    text += ["", "Notes:", *[f"- {n}" for n in report["notes"]], "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; date {report['date']}; wall time of the last invocation that ran cells "
             f"{fmt_time(report['wall_s_this_invocation'])} (a cell resumed over several invocations shows only "
             "its last part here); sum of per-cell wall times recorded by the script "
             f"{fmt_time(report['wall_s_cells_total'])}."]
    return "\n".join(text) + "\n"


def postprocessed_table(report: dict) -> list[str]:
    """Markdown lines of the table after keep-largest-component post-processing, or none if no cell has it."""
    cells, settings = report["cells"], report["settings"]["labeled"]
    methods = [m for m in report["settings"]["methods"]
               if any("postprocessed" in cells.get(f"{m}_n{s}", {}) for s in settings)]
    if not methods:
        return []
    lines = ["With post-processing: keep-largest-component, decided for each cell on its validation predictions "
             "as `samunet_find_best_configuration` (like nnU-Net's find-best) decides it on a cross-validation "
             "(each class alone, kept for the classes where it raises the mean foreground "
             "Dice), so chosen on the cases it is scored on, for every method alike. In brackets: per class, then "
             "the classes post-processed; '—': the cell's predictions were not at hand.", "",
             "| method | " + " | ".join(f"{s} labelled" if s != "all" else "all" for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for m in methods:
        row = [LABELS.get(m, m)]
        for s in settings:
            p = cells.get(f"{m}_n{s}", {}).get("postprocessed")
            if p is None:
                row.append("—")
                continue
            per = " / ".join(f"{p['dice_per_class'][k]:.3f}" for k in sorted(p["dice_per_class"], key=int))
            kept = ", ".join(map(str, p["keep_largest_component"])) or "none"
            row.append(f"**{p['mean_foreground_dice']:.3f}** ({per}; {kept})")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def budgets_in_study(report: dict) -> dict:
    """The budgets (heads, unet, nnunet) of the kinds of method this study ran."""
    methods = report["settings"]["methods"]
    ran = {"heads": any(m not in ("unet", "nnunet", SSL) for m in methods), "unet": "unet" in methods or SSL in methods,
           "nnunet": "nnunet" in methods, "pretrain": SSL in methods}
    return {k: b for k, b in report["budgets"].items() if ran.get(k)}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    n_train = report["settings"]["num_train_cases_by_setting"]
    styles = {"autosam": "o-", "cnn": "s-", "linear": "^-", "hybrid": "*-", ST: "*:", "unet": "x--", SSL: "+--",
              "nnunet": "d--"}
    labels = {}  # x -> [(Dice, text, colour)]: the training time of each cell, placed after all lines are drawn
    for m in report["settings"]["methods"]:
        done = [(n_train[s], c["mean_foreground_dice"], c.get("training_time_s"))
                for s in report["settings"]["labeled"] if (c := report["cells"].get(f"{m}_n{s}")) is not None]
        if done:
            line, = ax.plot([d[0] for d in done], [d[1] for d in done], styles.get(m, "o-"), label=LABELS.get(m, m))
            for x, y, t in done:
                labels.setdefault(x, []).append((y, fmt_time(t), line.get_color()))
    last = max(labels) if labels else None
    for x, items in labels.items():
        prev = None
        for y, text, colour in sorted(items):  # bottom-up, each label at least 0.045 above the one below it
            t = y + 0.02 if prev is None else max(y + 0.02, prev + 0.045)
            prev = t
            ax.annotate(text, (x, t), xytext=(-4 if x == last else 4, 0), textcoords="offset points", fontsize=6,
                        color=colour, ha="right" if x == last else "left", va="center")
    ax.set_xscale("log")
    ticks = sorted({n_train[s] for s in report["settings"]["labeled"]})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("mean foreground Dice (validation)")
    ax.text(0.01, 0.99, "labels: training time of each cell", transform=ax.transAxes, fontsize=7, va="top")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    budgets = {(b["epochs"], b["iterations"], b["batch_size"]) for b in budgets_in_study(report).values()}
    same = f"{'x'.join(str(v) for v in budgets.pop())} for every method" if len(budgets) == 1 else ""
    detail = ", ".join(x for x in ("quick budget" if report["quick"] else "", same) if x)
    ax.set_title(f"{report['dataset']} fold {report['fold']}" + (f" ({detail})" if detail else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes stays whole
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="4", help="data set id or name (default 4)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--labeled", nargs="+", default=None,
                   help="numbers of labelled training cases, 'all' for the whole fold (default 1 2 5 10 all; "
                        "--quick: 1 5 all)")
    p.add_argument("--heads", nargs="*", default=None,
                   help="samunet models, HEAD or HEAD:CONFIGURATION (e.g. hybrid:2.5d_emb; default configuration "
                        "2d), HEAD one of " + ", ".join(HEADS) + f", {SSL} (the U-Net after samunet_pretrain) or "
                        f"{ST} (self-training, after hybrid in the same column: its teacher) (default: autosam cnn "
                        "linear unet; --quick: autosam "
                        "cnn unet)")
    p.add_argument("--no_nnunet", action="store_true", help="leave nnU-Net out")
    p.add_argument("--quick", action="store_true", help="small CPU budget (see QUICK); results get a _quick suffix")
    p.add_argument("--plateau", action="store_true",
                   help="train every samunet cell to its plateau (early stopping with --patience, the epochs as cap) "
                        "and give nnU-Net at least as many iterations as the longest samunet cell of its column, at "
                        "the same batch size; results get a _plateau suffix")
    p.add_argument("--patience", type=int, default=None,
                   help="--plateau: epochs without a new best moving-average pseudo-Dice (default: the plans')")
    p.add_argument("--epochs", type=int, default=None, help="heads and U-Net: epochs (default: plans; quick 4)")
    p.add_argument("--iterations", type=int, default=None,
                   help="heads and U-Net: iterations per epoch (default: plans; quick 10)")
    p.add_argument("--batch_size", type=int, default=None, help="heads and U-Net: batch size (default: plans)")
    p.add_argument("--augmented_views", type=int, default=None,
                   help="hybrid heads: augmented views per labelled slice (samunet_train --augmented_views; default: "
                        "the plans' rule); a study of another number of views needs its own --suffix")
    p.add_argument("--pseudo_label_tta", action="store_true",
                   help=f"{ST}: the teacher labels with mirroring TTA (samunet_train --pseudo_label_tta); needs its "
                        "own --suffix and samunet_results (the teacher's model folder linked there)")
    p.add_argument("--unet_epochs", type=int, default=None, help="U-Net: epochs (default: as the heads)")
    p.add_argument("--unet_iterations", type=int, default=None, help="U-Net: iterations (default: as the heads)")
    p.add_argument("--pretrain_epochs", type=int, default=None,
                   help="unet_ssl: epochs of samunet_pretrain (default: the U-Net's epochs; its iterations and "
                        "batch size too, without early stopping)")
    p.add_argument("--nnunet_epochs", type=int, default=None, help="nnU-Net: epochs (default 250; quick 4)")
    p.add_argument("--nnunet_iterations", type=int, default=None, help="nnU-Net: iterations (default 250)")
    p.add_argument("--nnunet_val_iterations", type=int, default=None, help="nnU-Net: (default 50)")
    p.add_argument("--nnunet_batch_size", type=int, default=None, help="nnU-Net: batch size (default: its plans)")
    p.add_argument("--nnunet_extensions", type=int, default=1,
                   help="--plateau: an nnU-Net cell still rising at the end is trained again from scratch with 25%% "
                        "more epochs, up to this many times (default 1; 0: never)")
    p.add_argument("--nnunet_bin", default=None, help="bin folder of nnU-Net's environment")
    p.add_argument("--nnunet_da_processes", type=int, default=0,
                   help="nnU-Net augmentation worker processes (default 0: in the training process)")
    p.add_argument("--nnunet_threads", type=int, default=None,
                   help="nnU-Net: torch threads (default: its own choice, every core)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--crosscheck_predict", action="store_true",
                   help="re-predict the first head's largest setting with samunet_predict (no mirroring) and "
                        "compare its Dice with the final-validation files")
    p.add_argument("--retrain", action="store_true",
                   help="train again the cells that the results file records but this machine's work folder has "
                        "no trace of (default: keep them as recorded)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: write the report from the cells that have finished (others show as missing)")
    p.add_argument("--suffix", default="",
                   help="appended to the names of the results and of the work folder: a second study of the same "
                        "fold under another budget (e.g. --epochs 200 --suffix _e200) keeps its own cells; give it "
                        "its own samunet_results too")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    t_start = time.time()
    load_start = os.getloadavg()[0]

    for var in ("samunet_raw", "samunet_preprocessed", "samunet_results"):
        if not os.environ.get(var):
            raise SystemExit(f"set {var} (see the module docstring)")
    from samunet.paths import preprocessed_folder, resolve_dataset_name
    from samunet.planning.plans import get_configuration, load_plans
    from samunet.training.splits import SPLIT_SEED, get_split, labeled_subset
    a.dataset_name = resolve_dataset_name(a.dataset)
    a.raw = Path(os.environ["samunet_raw"]) / a.dataset_name
    pp = preprocessed_folder() / a.dataset_name
    plans = load_plans(a.dataset_name)
    cfg = get_configuration(plans, "2d")
    ending = plans["file_ending"]
    ids = load_json(pp / "dataset_fingerprint.json")["case_identifiers"]
    train, val = get_split(pp, ids, a.fold)
    labeled = a.labeled or (QUICK["labeled"] if a.quick else ["1", "2", "5", "10", "all"])
    for s in labeled:
        if s != "all" and (not s.isdigit() or int(s) < 1):
            raise SystemExit(f"--labeled takes positive numbers or 'all', got {s}")
    subsets = {s: labeled_subset(train, None if s == "all" else int(s), a.fold, SPLIT_SEED) for s in labeled}

    if a.heads is None:
        a.heads = list(QUICK["models"]) if a.quick else list(HEADS)
    for m in a.heads:
        split_method(m)  # an unknown model stops here, before anything runs
    if a.quick:
        heads_b = dict(QUICK["heads"])
        unet_b = dict(QUICK["unet"])
        nn_b = dict(QUICK["nnunet"])
    else:
        heads_b = {"epochs": cfg["num_epochs"], "iterations": cfg["iterations_per_epoch"],
                   "batch_size": cfg["batch_size"]}
        unet_b = dict(heads_b)
        nn_b = {"epochs": 250, "iterations": 250, "val_iterations": 50, "batch_size": None}
    for key, val_ in (("epochs", a.epochs), ("iterations", a.iterations), ("batch_size", a.batch_size)):
        if val_ is not None:
            heads_b[key] = val_
            unet_b[key] = val_  # the U-Net follows the heads' budget unless --unet_* says otherwise
    if a.unet_epochs is not None:
        unet_b["epochs"] = a.unet_epochs
    if a.unet_iterations is not None:
        unet_b["iterations"] = a.unet_iterations
    pre_b = {k: unet_b[k] for k in ("epochs", "iterations", "batch_size")}  # pre-training: the U-Net's budget
    if a.pretrain_epochs is not None:
        pre_b["epochs"] = a.pretrain_epochs
    for key, val_ in (("epochs", a.nnunet_epochs), ("iterations", a.nnunet_iterations),
                      ("val_iterations", a.nnunet_val_iterations), ("batch_size", a.nnunet_batch_size)):
        if val_ is not None:
            nn_b[key] = val_

    if a.plateau:
        if a.quick:
            raise SystemExit("--plateau and --quick exclude each other")
        heads_b["patience"] = unet_b["patience"] = a.patience if a.patience is not None else \
            int(cfg.get("early_stopping_patience", 15))
        if a.nnunet_batch_size is None:
            nn_b["batch_size"] = heads_b["batch_size"]
        if a.nnunet_iterations is None:
            nn_b["iterations"] = heads_b["iterations"]
        if a.nnunet_val_iterations is None:
            nn_b["val_iterations"] = 5
    tag = f"label_efficiency_{a.dataset_name.split('_')[0].replace('Dataset', '')}_fold{a.fold}" + \
        ("_quick" if a.quick else "_plateau" if a.plateau else "") + a.suffix
    if a.suffix and not re.fullmatch(r"[A-Za-z0-9_.-]+", a.suffix):
        raise SystemExit(f"--suffix {a.suffix!r}: letters, digits, '_', '.' and '-' only")
    work = HERE / "work" / tag
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(a.heads) + ([] if a.no_nnunet else ["nnunet"])
    report_file = out_dir / f"{tag}.json"
    old = load_json(report_file) if report_file.is_file() else {}
    cells = dict(old.get("cells", {}))
    log(f"{a.dataset_name} fold {a.fold}: {len(train)} training / {len(val)} validation cases; labelled settings "
        f"{labeled}; methods {methods}")

    nn = None
    if not a.no_nnunet:
        nn = NnUNet(a, work, nn_b)
        if not a.report_only:
            nn.install_trainer()
            nn.preprocess()
    splits = load_json(pp / "splits_final.json")
    for s in labeled:
        for m in methods:
            key = f"{m}_n{s}"
            log(f"--- {key}")
            if m == "nnunet" and a.plateau:  # at least the iterations of the longest samunet cell of this column
                done = [c["iterations_done"] for k, c in cells.items()
                        if k.endswith(f"_n{s}") and not k.startswith("nnunet") and "iterations_done" in c]
                # nnU-Net alone in a column (no samunet cell finished yet): the column's cap, which no samunet
                # cell can exceed
                longest = max(done) if done else max(b["epochs"] * b["iterations"] for b in (heads_b, unet_b))
            recorded = cells.get(key)
            if recorded is not None and not a.retrain and not (work / "cells" / f"{key}.json").is_file() and \
                    not (m == "nnunet" and a.plateau and nnunet_owes(recorded, longest, a.nnunet_extensions)):
                # a finished cell of the results file, trained on another machine whose work folder is not here:
                # keep it rather than train it again or drop it from the report
                log(f"{key}: kept as recorded in {report_file.name} (no trace of it under {work}; --retrain "
                    f"trains it again)")
                continue
            if m == "nnunet":
                column_nn = nn
                if a.plateau:
                    if len(done) < len(methods) - 1 and not a.report_only:
                        log(f"nnunet n={s}: waits until every samunet cell of the column has finished")
                        continue
                    column_nn = NnUNet(a, work, {**nn_b, "epochs": -(-longest // nn_b["iterations"])})
                idx = column_nn.split_index(splits, a.fold, subsets[s], val)  # 'all' finds fold K itself
                if a.plateau and recorded is not None and not a.retrain and recorded.get("iterations_done", 0) >= \
                        longest and not (work / "cells" / f"{key}.json").is_file():
                    # long enough but still rising, trained elsewhere: only the extension is trained here
                    cell = dict(recorded)
                    column_nn = NnUNet(a, work, {**nn_b, "epochs": cell["epochs"]})
                else:
                    cell = column_nn.cell(s, idx, subsets[s], val, ending, a.raw)
                shorter = cell.pop("shorter_runs", []) if cell else []
                for _ in range(a.nnunet_extensions - len(shorter) if a.plateau else 0):  # still rising: 25% more
                    if cell is None or not cell["still_rising"]:
                        break
                    epochs = -(-column_nn.budget["epochs"] * 5 // 4)
                    shorter.append({k: cell[k] for k in ("iterations_done", "mean_foreground_dice", "dice_per_class",
                                                         "training_time_s", "cell_wall_s", "last_new_best_epoch")})
                    longer_nn = NnUNet(a, work, {**nn_b, "epochs": epochs})
                    longer = longer_nn.cell(s, idx, subsets[s], val, ending, a.raw, name=f"nnunet_n{s}_e{epochs}")
                    if longer is None:  # --report_only and the longer run has not finished: the shorter one
                        shorter.pop()  # shown as the cell itself, not also as its own shorter run
                        cell["longer_run_unfinished_iterations"] = epochs * nn_b["iterations"]
                        break
                    cell, column_nn = longer, longer_nn
                if shorter:
                    cell["shorter_runs"] = shorter
                if cell is None and a.plateau and a.report_only:  # no run of that length: the longest finished
                    finished = column_nn.longest_finished(idx, val, ending)
                    if finished is not None:
                        cell = NnUNet(a, work, {**nn_b, "epochs": finished}).cell(s, idx, subsets[s], val, ending,
                                                                                 a.raw)
                        if finished * nn_b["iterations"] < longest:
                            cell["fewer_iterations_than_longest_samunet_cell"] = longest
            else:
                pretrained = None
                if split_method(m)[0] == ST and s == "all":
                    log(f"{m} n=all: no unlabelled training case to self-train on; left out")
                    continue
                if split_method(m)[0] == SSL:
                    pretrained = pretrain_cell(a, split_method(m)[1], pre_b, work)
                    if pretrained is None:
                        log(f"{m} n={s}: pre-training not finished; left out of the report (--report_only)")
                        cells.pop(key, None)
                        continue
                cell = samunet_cell(a, m, s, subsets[s], val, unet_b if m in ("unet", SSL) else heads_b, ending,
                                    a.raw, work, pretrained)
            if cell is None:
                cells.pop(key, None)
                continue
            cells[key] = cell
            log(f"{key}: mean foreground Dice {cells[key]['mean_foreground_dice']:.4f}")

    for key in [f"{m}_n{s}" for s in labeled for m in methods if f"{m}_n{s}" in cells]:
        pp_cell = postprocessed(cells[key], key, a.raw, val, ending, work)
        if pp_cell is not None:  # a recorded figure stays where the predictions are no longer here
            cells[key]["postprocessed"] = pp_cell

    # --report_only keeps the figures of the invocation that trained (its date, wall time and machine load)
    keep = a.report_only and "run" in old
    run_info = old["run"] if keep else {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.time() - t_start, 1), "load_avg_1min": [load_start, os.getloadavg()[0]]}
    load = run_info["load_avg_1min"]
    crosscheck = old.get("crosscheck_predict")
    if a.crosscheck_predict:
        crosscheck = crosscheck_predict(a, methods, labeled, subsets, val, cells, ending, work)

    label_names = {str(v): k for k, v in load_json(a.raw / "dataset.json")["labels"].items()}
    class_names = [label_names[str(v)] for v in plans["label_values"] if v != 0]
    notes = [
        "Labelled subsets are nested and seeded (`labeled_subset`), identical for every method; nnU-Net gets them "
        "through extra entries of its `splits_final.json` (folds >= 5; 'all' is fold "
        f"{a.fold} itself), with samunet's five folds as its folds 0-4.",
        "samunet models are scored on the files their final validation writes (`fold_K/validation`, original "
        "geometry, same `predict_preprocessed` code as `samunet_predict`, with mirroring test-time augmentation only "
        "for models trained with mirroring (the U-Net, and hybrid heads trained on augmented views); heads read the "
        "cached embeddings instead of re-encoding every slice). nnU-Net is scored on its own final validation "
        "(with its default mirroring).",
        "Training times are wall-clock times; they depend on what else the machine runs: the 1-minute load average "
        f"was {load[0]:.1f} when the training run started and {load[1]:.1f} when it ended "
        f"({os.cpu_count()} cores). The heads' times leave out building the embedding cache of the frozen encoder, "
        "which is paid once per data set at preprocessing.",
    ]
    if "unet" in methods:
        unet_px = (cfg.get("unet") or {}).get("canvas_size") or cfg["encoder_input_size"]
        notes.insert(2, "The U-Net from scratch uses nnU-Net's 2d topology rule for its canvas "
                        f"({unet_px} px, the resized slice, as the hybrid head's image path), nnU-Net's SGD and poly "
                        "schedule and "
                        "samunet's Dice + cross-entropy loss without deep supervision; nnU-Net itself works on its "
                        "own patch at the native resolution, with its own plans (its own slice axis, patch size and "
                        "normalisation).")
    if a.quick:
        notes.append("Quick budget: every method gets the same few training samples and is far from converged, "
                     "the networks trained from scratch most of all. The quick numbers compare what that budget buys, "
                     "not converged models; run without --quick on a GPU for that.")
    missing = [f"{m}_n{s}" for s in labeled for m in methods if f"{m}_n{s}" not in cells]
    if missing:
        notes.append(f"Not finished, shown as '—': {', '.join(missing)}. Rerunning the command completes them "
                     "(finished cells are skipped, interrupted ones continue).")
    report = {
        "dataset": a.dataset_name, "fold": a.fold, "quick": a.quick, "plateau": a.plateau,
        "command": "python benchmarks/label_efficiency.py " + " ".join(
            x for x in (sys.argv[1:] if argv is None else argv) if x != "--report_only"),
        "date": run_info["date"], "run": run_info,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device {a.device}",
        "num_train_cases_fold": len(train), "num_val_cases": len(val), "val_cases": val,
        "class_names": class_names,
        "settings": {"labeled": labeled, "methods": methods,
                     "num_train_cases_by_setting": {s: len(subsets[s]) for s in labeled},
                     "subsets": subsets, "split_seed": SPLIT_SEED},
        "budgets": {"heads": {**heads_b,
                              **({} if a.augmented_views is None else {"augmented_views": a.augmented_views}),
                              **({"pseudo_label_tta": True} if a.pseudo_label_tta else {})},
                    "unet": unet_b, "pretrain": pre_b,
                    **({"nnunet": {**nn_b, **({"extensions": a.nnunet_extensions} if a.plateau else {})}}
                       if nn else {})},
        "samunet_plans": {"encoder": plans["encoder"]["name"], "encoder_input_size": cfg["encoder_input_size"],
                          "inplane_mode": cfg["inplane_mode"], "slice_axis": cfg["slice_axis"],
                          "unet": cfg.get("unet") or __import__("samunet.models.unet", fromlist=["x"]).canvas_block(
                              cfg)},
        "nnunet_preprocess_wall_s": nn.preprocess_time() if nn else None,
        # every recorded cell stays, also those of methods or settings this invocation leaves out (an invocation
        # for one cell must not drop the others); the tables show this invocation's methods and settings
        "cells": cells,
        "crosscheck_predict": crosscheck,
        "missing_cells": missing,
        "notes": notes,
    }
    report["wall_s_this_invocation"] = run_info["wall_s"]
    shown = [cells[f"{m}_n{s}"] for s in labeled for m in methods if f"{m}_n{s}" in cells]
    report["wall_s_cells_total"] = round(sum(c.get("cell_wall_s", 0) for c in shown)
                                         + (report["nnunet_preprocess_wall_s"] or 0), 1)
    report = portable(report)
    save_json(report, report_file)
    (out_dir / f"{tag}.md").write_text(markdown(report))
    plot(report, out_dir / f"{tag}.png")
    log(f"wrote {report_file}, {tag}.md and {tag}.png")
    print(markdown(report))


def crosscheck_predict(a, methods, labeled, subsets, val, cells, ending, work) -> dict | None:
    """Predict one head cell's validation cases with samunet_predict and compare with its final validation."""
    heads = [m for m in methods if m in ENCODER_HEADS]
    if not heads:
        return None
    head, s = heads[0], labeled[-1]
    inp = work / "crosscheck" / "input"
    if inp.exists():
        shutil.rmtree(inp)
    inp.mkdir(parents=True)
    for c in val:
        for img in sorted((a.raw / "imagesTr").glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}")):
            os.symlink(img, inp / img.name)
    out = work / "crosscheck" / f"{head}_n{s}"
    cmd = console("samunet_predict") + ["-i", str(inp), "-o", str(out), "-d", str(a.dataset), "-c", "2d", "--head",
                                        head, "-f", str(a.fold), "--disable_tta", "--continue_prediction",
                                        "--device", a.device]
    if s != "all":
        cmd += ["--num_labeled_cases", s]
    t = run(cmd, log_file=work / "logs" / "crosscheck.log")
    r = evaluate(a.raw, out, val, ending, work / "eval" / f"crosscheck_{head}_n{s}.json")
    ref = cells[f"{head}_n{s}"]["mean_foreground_dice"]
    return {"cell": f"{head}_n{s}", "samunet_predict_dice": r["mean_foreground_dice"], "final_validation_dice": ref,
            "abs_difference": abs(r["mean_foreground_dice"] - ref), "predict_wall_s": round(t, 1)}


if __name__ == "__main__":
    main()
