"""Prediction speed, peak memory and Dice of ``samunet_predict`` on held-out Hippocampus cases: one fold versus the
five-fold ensemble, with and without mirroring test-time augmentation, beside nnU-Net v2's ``nnUNetv2_predict``.

    python benchmarks/predict_speed.py -m MODEL_DIR [--num_cases 10] [--data ../shared/data] [--dataset 4]
                                       [--nnunet_model NNUNET_MODEL_DIR | --skip_nnunet]

MODEL_DIR is a trained samunet model folder (``TRAINER__PLANS__CONFIG`` with ``fold_0`` ... ``fold_4``). The cases
are raw training images that no fold of that model trained on (read from each fold's ``debug.json``), so their
labels give an honest Dice for the single fold and for the ensemble. Train the folds with
``--num_labeled_cases N`` to leave such cases; a model trained on complete folds has none, and the benchmark says so.

Every setting runs ``samunet_predict_from_modelfolder`` as a fresh process, once on all cases and once on a single
case: seconds per case are given both including start-up (wall time / cases) and as the marginal cost
((T_all - T_one) / (cases - 1)). Peak memory is the maximum resident set size of that process (``wait4``).
nnU-Net is timed the same way on the same cases when a trained nnU-Net model folder is given or found under
``benchmarks/work`` (the label-efficiency benchmark trains one); it runs from its own virtual environment.

Before the runs it works out the encoder's floor: the images ``samunet_predict`` encodes per case (from the cases
preprocessed with the model's plans), the FLOP of each (LiteMedSAM) and the seconds that takes at the machine's
measured sgemm rate, the least time any float32 path of the encoder can take.

Writes benchmarks/results/predict_speed.json and .md (``--out``: another folder).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_speed import (_cpu_busy_fraction, _dataset_folder, _display_path, _git_commit,  # noqa: E402
                              _machine, _nnunet_version)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
NNUNET_BIN = REPO_ROOT / "benchmarks" / ".venv-nnunet" / "bin"


def _run(cmd: list[str], env: dict) -> dict:
    """Run a command as its own process; wall time and its peak resident memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed with exit code {code}:\n{out[-3000:]}")
    return {"seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def _held_out_cases(model_dir: Path, raw: Path, ending: str) -> tuple[list[str], list[str]]:
    folds = sorted(int(p.name[5:]) for p in model_dir.glob("fold_[0-9]") if (p / "checkpoint_final.pth").is_file())
    if not folds:
        raise SystemExit(f"error: {model_dir}: no fold with checkpoint_final.pth")
    trained_on = set()
    for f in folds:
        debug = model_dir / f"fold_{f}" / "debug.json"
        if not debug.is_file():
            raise SystemExit(f"error: {debug} not found; cannot tell which cases fold {f} trained on")
        trained_on |= set(json.loads(debug.read_text())["train_cases"])
    cases = sorted(p.name[: -len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}"))
    return [c for c in cases if c not in trained_on], [str(f) for f in folds]


def _find_nnunet_model(explicit: str | None, dataset_name: str) -> tuple[Path | None, str]:
    if explicit:
        p = Path(explicit)
        return (p, "--nnunet_model") if list(p.glob("fold_*/checkpoint_final.pth")) else \
            (None, f"--nnunet_model {explicit}: no fold_*/checkpoint_final.pth in it")
    found = sorted({c.parent.parent for c in (REPO_ROOT / "benchmarks" / "work").glob(
        f"**/{dataset_name}/*__*__2d/fold_*/checkpoint_final.pth")})
    if found:
        return found[0], "found under benchmarks/work"
    return None, ("no trained nnU-Net model: none given with --nnunet_model and none under benchmarks/work "
                  "(benchmarks/label_efficiency.py trains one)")


def _dice(gt_folder: Path, pred: Path, labels: list[int], ending: str, cases: list[str]) -> dict:
    from samunet.evaluation.evaluate import evaluate_folder
    s = evaluate_folder(gt_folder, pred, labels, ending, output_file=pred / "summary.json", cases=cases, chill=False)
    return {"foreground": round(s["foreground_mean"]["Dice"], 4),
            "per_class": {k: round(v["Dice"], 4) for k, v in s["mean"].items()}}


def _encoder_floor(model_dir: Path, raw: Path, cases: list[str], ending: str, n_channels: int) -> dict | None:
    """The encoder's arithmetic per case: the images ``samunet_predict`` encodes (slices x tiles x channel images of
    each preprocessed case, times four with mirroring), their FLOP, and the seconds that takes at this machine's
    large-sgemm rate on every core. No float32 path of the same network can be faster; None for encoders other than
    LiteMedSAM."""
    import torch
    from encoder_speed import count_gflops_per_image, sgemm_gflops
    from samunet.models.cpu import usable_cores
    from samunet.planning.plans import get_configuration
    from samunet.preprocessing.encoder_inputs import make_layout, num_encoder_images
    from samunet.preprocessing.preprocessor import preprocess_case
    plans = json.loads((model_dir / "plans.json").read_text())
    if plans["encoder"]["name"] != "lite_medsam":
        return None
    config = get_configuration(plans, model_dir.name.split("__")[-1])
    images = []
    for c in cases:
        files = [raw / "imagesTr" / f"{c}_{ch:04d}{ending}" for ch in range(n_channels)]
        data, _, _ = preprocess_case(files, None, config, plans["label_values"])
        images.append(data.shape[1] * len(make_layout(data.shape[2:], config)["tiles"])
                      * num_encoder_images(config, data.shape[0]))
    gflop = count_gflops_per_image(int(config["encoder_input_size"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one core's rate in its own CPU time (little moved by other load), times the cores: an upper bound
        one_core = sgemm_gflops("thread_cpu")
    finally:
        torch.set_num_threads(threads)
    cores = usable_cores()
    rate = cores * one_core
    per_case = sum(images) / len(images)
    return {"encoder_images_per_case": round(per_case, 1), "encoder_input_size": int(config["encoder_input_size"]),
            "gflop_per_image": round(gflop, 2), "sgemm_gflops": round(rate, 1), "cores": cores,
            "floor_s_per_case": {"no TTA": round(per_case * gflop / rate, 2),
                                 "TTA": round(4 * per_case * gflop / rate, 2)}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", required=True, help="trained samunet model folder (TRAINER__PLANS__CONFIG)")
    p.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"), help="raw data folder")
    p.add_argument("--dataset", default="4", help="raw data set id or folder name (default 4, Hippocampus)")
    p.add_argument("--num_cases", type=int, default=10, help="held-out cases to predict (default 10)")
    p.add_argument("--nnunet_model", default=None, help="trained nnU-Net model folder (TRAINER__PLANS__CONFIG)")
    p.add_argument("--nnunet_folds", nargs="+", default=None, help="nnU-Net folds to use (default: every trained fold)")
    p.add_argument("--skip_nnunet", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS), help="folder of predict_speed.json and .md (default: "
                   "benchmarks/results)")
    a = p.parse_args(argv)

    model_dir = Path(a.m).resolve()
    raw = _dataset_folder(Path(a.data), a.dataset)
    meta = json.loads((raw / "dataset.json").read_text())
    ending = meta["file_ending"]
    labels = sorted(v for v in meta["labels"].values() if v != 0)
    n_channels = len(meta.get("channel_names", meta.get("modality", {"0": ""})))
    held_out, folds = _held_out_cases(model_dir, raw, ending)
    if len(held_out) < 2:
        raise SystemExit(f"error: only {len(held_out)} case(s) of {raw.name} were not used to train {model_dir.name}; "
                         "train the folds with --num_labeled_cases to keep held-out cases")
    cases = held_out[: a.num_cases]
    samunet_bin = Path(sys.executable).parent / "samunet_predict_from_modelfolder"
    nn_model, nn_reason = (None, "skipped (--skip_nnunet)") if a.skip_nnunet else _find_nnunet_model(a.nnunet_model,
                                                                                                     raw.name)
    nn_predict = NNUNET_BIN / "nnUNetv2_predict"
    if nn_model is not None and not nn_predict.is_file():
        nn_model, nn_reason = None, "nnUNetv2_predict not found in benchmarks/.venv-nnunet (setup_nnunet_env.sh)"

    floor = _encoder_floor(model_dir, raw, cases, ending, n_channels)
    rows = []
    with tempfile.TemporaryDirectory(prefix="samunet_predict_speed_") as tmp:
        tmp = Path(tmp)
        inp_all, inp_one, gt = tmp / "in_all", tmp / "in_one", tmp / "gt"
        for d in (inp_all, inp_one, gt):
            d.mkdir()
        for i, c in enumerate(cases):
            for ch in range(n_channels):
                src = raw / "imagesTr" / f"{c}_{ch:04d}{ending}"
                shutil.copy(src, inp_all)
                if i == 0:
                    shutil.copy(src, inp_one)
            shutil.copy(raw / "labelsTr" / f"{c}{ending}", gt)
        env = os.environ.copy()
        # mirroring TTA applies only to models trained with mirroring augmentation (not heads on cached embeddings)
        from samunet.models.run_checkpoint import load_checkpoint
        state = load_checkpoint(model_dir / f"fold_{folds[0]}" / "checkpoint_final.pth")
        mirrored = bool(state.get("mirroring_axes", [] if state.get("use_cache", True) else [0, 1]))
        tta_options = (False, True) if mirrored else (False,)
        settings = [("samunet", "1 fold", ["0"] if "0" in folds else folds[:1], tta) for tta in tta_options]
        if len(folds) > 1:
            settings += [("samunet", f"{len(folds)} folds", folds, tta) for tta in tta_options]
        nn_folds = []
        if nn_model is not None:
            nn_folds = a.nnunet_folds or sorted(q.parent.name[5:] for q in nn_model.glob("fold_*/checkpoint_final.pth"))
            settings += [("nnU-Net", f"{len(nn_folds)} fold{'s' if len(nn_folds) > 1 else ''}", nn_folds, tta)
                         for tta in (False, True)]
        for tool, label, fset, tta in settings:
            busy = _cpu_busy_fraction(1.0)
            timings = {}
            for name, inp in (("all", inp_all), ("one", inp_one)):
                out = tmp / f"out_{tool}_{len(fset)}_{int(tta)}_{name}"
                if tool == "samunet":
                    cmd = [str(samunet_bin), "-i", str(inp), "-o", str(out), "-m", str(model_dir), "-f", *fset,
                           "--device", a.device] + ([] if tta else ["--disable_tta"])
                    run_env = env
                else:
                    trainer, plans, config = nn_model.name.split("__")
                    cmd = [str(nn_predict), "-i", str(inp), "-o", str(out), "-d", raw.name, "-c", config,
                           "-tr", trainer, "-p", plans, "-f", *fset, "-device", a.device] + \
                        ([] if tta else ["--disable_tta"])
                    run_env = dict(env, nnUNet_results=str(nn_model.parent.parent),
                                   nnUNet_raw=str(tmp / "nnunet_raw"), nnUNet_preprocessed=str(tmp / "nnunet_pp"))
                print(f"{tool} {label} {'TTA' if tta else 'no TTA'}: {name} ({len(cases) if name == 'all' else 1} "
                      f"case(s)) ...", flush=True)
                timings[name] = _run(cmd, run_env)
                if name == "all":
                    timings["dice"] = _dice(gt, out, labels, ending, cases)
            t_all, t_one = timings["all"]["seconds"], timings["one"]["seconds"]
            row = {"tool": tool, "folds": label, "fold_list": fset, "tta": tta, "cases": len(cases),
                   "seconds_total": t_all, "seconds_one_case": t_one,
                   "s_per_case_incl_startup": round(t_all / len(cases), 2),
                   "s_per_case_marginal": round((t_all - t_one) / (len(cases) - 1), 2),
                   "peak_rss_mb": max(timings["all"]["peak_rss_mb"], timings["one"]["peak_rss_mb"]),
                   "dice": timings["dice"], "other_load_before": busy}
            rows.append(row)
            print(f"  {row['s_per_case_marginal']:.2f} s/case marginal, {row['s_per_case_incl_startup']:.2f} s/case "
                  f"with start-up, peak {row['peak_rss_mb']:.0f} MB, Dice {row['dice']['foreground']:.4f}", flush=True)

    base = next(r for r in rows if r["tool"] == "samunet" and r["folds"] == "1 fold" and not r["tta"])
    for r in rows:
        r["time_vs_samunet_1fold_noTTA"] = round(r["s_per_case_marginal"] / base["s_per_case_marginal"], 2)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
              "commit": _git_commit(), "command": "python benchmarks/predict_speed.py " + " ".join(
                  _display_path(Path(x)) if os.sep in x else x for x in (argv if argv is not None else sys.argv[1:])),
              "device": a.device, "dataset": raw.name, "model": model_dir.name, "folds": folds, "cases": cases,
              "samunet_mirroring_tta": mirrored, "encoder_floor": floor,
              "nnunet": {"model": nn_model.name if nn_model else None, "folds": nn_folds, "note": nn_reason,
                         "version": _nnunet_version(nn_predict) if nn_model else None},
              "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "predict_speed.md").write_text(_markdown(result))
    print((out / "predict_speed.md").read_text())


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Prediction speed: {r['dataset']}", "",
             f"`{r['command']}` — {r['date']}, commit {r['commit']}, {m['cpu']} ({m['cores_usable']} cores usable, "
             f"{m['memory_gb']} GB), device {r['device']}.", "",
             f"samunet model `{r['model']}`, folds {', '.join(r['folds'])}. {len(r['cases'])} held-out cases that no "
             f"fold trained on: {', '.join(r['cases'])}.", "",
             "| tool | folds | TTA | s/case (marginal) | s/case (incl. start-up) | time vs samunet 1 fold, no TTA "
             "| peak memory (MB) | Dice (fg mean) | Dice per class |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        per = ", ".join(f"{k}: {v:.4f}" for k, v in x["dice"]["per_class"].items())
        lines.append(f"| {x['tool']} | {x['folds']} | {'yes' if x['tta'] else 'no'} | {x['s_per_case_marginal']:.2f} "
                     f"| {x['s_per_case_incl_startup']:.2f} | {x['time_vs_samunet_1fold_noTTA']:.2f}x "
                     f"| {x['peak_rss_mb']:.0f} | {x['dice']['foreground']:.4f} | {per} |")
    nn = r["nnunet"]
    lines += ["", "Marginal s/case = (time for all cases - time for one case) / (cases - 1); start-up (imports, "
                  "model loading) is in the other column. Peak memory is the process's maximum resident set size.",
              "TTA is in-plane mirroring (4 views). The encoder runs once per slice and view for all folds."]
    if not r["samunet_mirroring_tta"]:
        lines.append("The samunet model's heads were trained on cached embeddings without mirroring augmentation, so "
                     "samunet_predict does not mirror them (mirrored views swap anterior and posterior); it has no "
                     "TTA rows.")
    if nn["model"]:
        lines.append(f"nnU-Net v2 {nn['version']}: model `{nn['model']}` ({nn['note']}), folds "
                     f"{', '.join(nn['folds'])}, default worker settings, `-device cpu`. Its Dice is on the same "
                     "cases but its training cases are its own (see the label-efficiency benchmark), so compare "
                     "its speed, not its Dice, here.")
    else:
        lines.append(f"nnU-Net: not measured: {nn['note']}.")
    f = r.get("encoder_floor")
    if f:
        lines.append(f"Encoder floor: {f['encoder_images_per_case']} encoder images per case at "
                     f"{f['encoder_input_size']} px ({f['gflop_per_image']} GFLOP each), four times that with "
                     f"mirroring; at this machine's 2048^3 sgemm rate ({f['sgemm_gflops']} GFLOP/s: one core's "
                     f"rate in its own CPU time times {f['cores']} cores) no float32 path of the encoder takes less "
                     f"than {f['floor_s_per_case']['no TTA']:.2f} s per case without TTA and "
                     f"{f['floor_s_per_case']['TTA']:.2f} s with it, whatever the folds (one encoding serves "
                     "them all).")
    loads = [x["other_load_before"] for x in r["rows"] if x["other_load_before"] is not None]
    if loads:
        lines.append(f"Other load on the machine before each setting: {min(loads):.0%}-{max(loads):.0%} of all cores.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
