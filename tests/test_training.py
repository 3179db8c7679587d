"""Training on real Hippocampus cases with the real LiteMedSAM encoder: Dice rises, runs resume after a kill,
bad checkpoints are refused, and prediction reproduces the final validation in the original geometry."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import HIPPO, hippo_slab, predict_slab, run_entry
from samunet.utils import SamunetError

NAME = "Dataset004_Hippocampus"
TRAIN = [sys.executable, "-c", "from samunet.cli import train_entry as m; m()"]
PREDICT = [sys.executable, "-c", "from samunet.cli import predict_entry as m; m()"]


def test_training_raises_dice_far_above_an_untrained_head(trained):
    import torch
    t, dice_before = trained
    summary = json.loads((t.output / "validation" / "summary.json").read_text())
    dice = summary["foreground_mean"]["Dice"]
    # the plans' default head, 120 steps of 8 slices on 4 labelled volumes (a few CPU minutes): far from converged,
    # far above untrained, and segmenting both classes
    assert dice > 0.5, summary["mean"]
    assert dice > dice_before + 0.4, (dice, dice_before)
    assert min(v["Dice"] for v in summary["mean"].values()) > 0.3, summary["mean"]
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "debug.json"):
        assert (t.output / name).is_file(), name
    assert not (t.output / "checkpoint_latest.pth").exists()
    assert sorted(p.name for p in (t.output / "validation").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in t.val_ids]
    assert len(t.val_ids) == 4 and len(t.train_ids) == 4
    # the planner's rule: a 64 px canvas for slices of about 36 x 50 px, the 128 px encoder input's embedding;
    # trained as nnU-Net trains its network (SGD)
    cfg = t.config
    assert cfg["head"] == "hybrid" and cfg["hybrid"]["canvas_size"] == 64 and "canvas_reason" in cfg["hybrid"]
    assert t.head.input_size == 64 and isinstance(t.optimizer, torch.optim.SGD)
    # the checkpoint holds the head and its optimiser state, not the frozen encoder again
    from samunet.models.run_checkpoint import load_checkpoint
    state = load_checkpoint(t.output / "checkpoint_final.pth")
    assert state["head"] == "hybrid" and state["mirroring_axes"] == []
    assert state["hybrid_architecture"]["canvas_size"] == 64
    head_bytes = sum(p.numel() * p.element_size() for p in t.head.parameters())
    assert (t.output / "checkpoint_final.pth").stat().st_size < 2 * head_bytes + 5e6  # weights + SGD momentum
    log = json.loads((t.output / "debug.json").read_text())
    assert log["num_labeled_cases"] == 4 and log["use_cache"] is True
    # the hybrid head is the plans' default; without the cache the planner's head for uncached embeddings trains
    from samunet.training.trainer import Trainer
    assert Trainer(4, "2d", 0, num_labeled_cases=4).head_name == "hybrid"
    assert Trainer(4, "2d", 0, num_labeled_cases=4, use_cache=False).head_name == "cnn"


def test_encoder_weights_never_change_during_training(trained):
    from samunet.models.encoders import build_encoder
    t, _ = trained
    fresh = build_encoder("lite_medsam", input_size=t.config["encoder_input_size"], optimise=True)
    for (k, a), (_, b) in zip(fresh.state_dict().items(), t.encoder.state_dict().items()):
        assert np.array_equal(a.numpy(), b.numpy()), k


def _evaluate_cli(cases, pred: Path, gt: Path) -> float:
    """samunet_evaluate_folder on ``pred`` against the raw labels of ``cases`` (copied to ``gt``): foreground Dice."""
    gt.mkdir()
    for c in cases:
        shutil.copy(HIPPO / "labelsTr" / f"{c}.nii.gz", gt)
    r = run_entry("evaluate_folder_entry", gt, pred, "-djfile", HIPPO / "dataset.json",
                  module="samunet.evaluation.cli")
    assert r.returncode == 0, r.stderr
    return json.loads((pred / "summary.json").read_text())["foreground_mean"]["Dice"]


def _recorded_dice(summary: Path, cases) -> float:
    """Mean foreground Dice of ``cases`` as the ``summary.json`` of an evaluated folder recorded it per case."""
    from samunet.evaluation.metrics import mean_metrics
    names = {f"{c}.nii.gz" for c in cases}
    per_case = json.loads(summary.read_text())["metric_per_case"]
    return mean_metrics([m["metrics"] for m in per_case if Path(m["prediction_file"]).name in names],
                        [1, 2])[1]["Dice"]


def _train(*args):
    """samunet_train in this process (no interpreter start-up)."""
    return run_entry("train_entry", "4", "2d", "0", *args)


def test_corrupt_and_foreign_checkpoints_are_refused(trained, hippo_env, tmp_path):
    from samunet.models.run_checkpoint import check_compatible, load_checkpoint
    t, _ = trained
    broken = tmp_path / "checkpoint_final.pth"
    broken.write_bytes((t.output / "checkpoint_final.pth").read_bytes()[:5000])
    with pytest.raises(SamunetError, match="not a readable samunet checkpoint"):
        load_checkpoint(broken)
    other = tmp_path / "other.pth"
    import torch
    torch.save({"state_dict": {}}, other)
    with pytest.raises(SamunetError, match="not a samunet checkpoint"):
        load_checkpoint(other)
    state = load_checkpoint(t.output / "checkpoint_final.pth")
    with pytest.raises(SamunetError, match="head is 'hybrid', expected 'cnn'"):
        check_compatible(state, "x", {"head": "cnn"})


def test_predict_matches_validation_and_keeps_geometry(trained, hippo_env, hippo_cli_prediction, tmp_path):
    t, _ = trained
    first, inp, out, stderr = hippo_cli_prediction  # default options, the first validation case
    a = sitk.ReadImage(str(HIPPO / "imagesTr" / f"{first}_0000.nii.gz"))
    b = sitk.ReadImage(str(out / f"{first}.nii.gz"))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    # validation used float16 cached embeddings, prediction recomputes them: the same up to rounding
    assert (_read(out / f"{first}.nii.gz") == _read(t.output / "validation" / f"{first}.nii.gz")).mean() > 0.995
    for f in ("plans.json", "dataset.json", "predict_from_raw_data_args.json"):
        assert (out / f).is_file()
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(out / f"{first}.nii.gz", pred)
    predicted = _evaluate_cli([first], pred, tmp_path / "gt")
    validated = _recorded_dice(t.output / "validation" / "summary.json", [first])
    assert abs(predicted - validated) < 0.01, (predicted, validated)
    # a head trained on cached embeddings without augmented views never saw mirrored slices: mirroring TTA is not
    # applied to it (it would swap anterior and posterior), so the default prediction gives the labels that
    # --disable_tta gives (checked on the middle slices of the case), with a warning
    assert "mirroring test-time augmentation is not applied" in stderr
    assert json.loads((out / "predict_from_raw_data_args.json").read_text())["tta_applied"] is False
    args = ("-d", "4", "-c", "2d", "-f", "0", "--num_labeled_cases", "4", "--head", "hybrid")
    default = _read(predict_slab(first, tmp_path / "default", *args) / f"{first}.nii.gz")
    notta = _read(predict_slab(first, tmp_path / "notta", *args, "--disable_tta") / f"{first}.nii.gz")
    assert np.array_equal(default, notta)


def test_predict_bad_inputs_are_named_and_others_still_predicted(trained, hippo_env, tmp_path):
    t, _ = trained
    good = t.val_ids[0]
    inp = tmp_path / "in"
    inp.mkdir()
    hippo_slab(good, inp / f"{good}_0000.nii.gz")
    (inp / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    shutil.copy(HIPPO / "imagesTr" / f"{t.val_ids[1]}_0000.nii.gz", inp / "wrongending_0000.nii")
    shutil.copy(HIPPO / "imagesTr" / f"{t.val_ids[1]}_0000.nii.gz", inp / "twochannels_0000.nii.gz")
    shutil.copy(HIPPO / "imagesTr" / f"{t.val_ids[1]}_0000.nii.gz", inp / "twochannels_0001.nii.gz")
    out = tmp_path / "out"
    cmd = PREDICT + ["-i", str(inp), "-o", str(out), "-d", "4", "-c", "2d", "-f", "0", "--num_labeled_cases", "4",
                     "--head", "hybrid", "--disable_tta"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1
    assert "case broken: " in r.stderr and "broken_0000.nii.gz: cannot be read" in r.stderr
    assert "wrongending_0000.nii: does not match CASE_XXXX.nii.gz" in r.stderr
    assert "case twochannels: " in r.stderr and "2 channel(s), but the plans expect 1" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / f"{good}.nii.gz").is_file()
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{good}.nii.gz"]
    assert not list(out.glob(".*"))  # no half-written files
    before = (out / f"{good}.nii.gz").stat().st_mtime_ns
    r = run_entry("predict_entry", *cmd[3:], "--continue_prediction")
    assert (out / f"{good}.nii.gz").stat().st_mtime_ns == before  # finished cases are not redone
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_entry("predict_entry", "-i", empty, "-o", tmp_path / "o2", "-d", "4", "-c", "2d",
                  "--num_labeled_cases", "4", "--head", "hybrid")
    assert r.returncode == 1 and "no cases named CASE_XXXX.nii.gz" in r.stderr
    r = run_entry("predict_entry", *cmd[3:-1], "-f", "3")
    assert r.returncode == 1 and "fold 3 has no checkpoint_final.pth" in r.stderr




def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_find_best_configuration_ensembles_postprocesses_and_its_instructions_work(trained, hippo_env, tmp_path):
    """Three trained heads with saved validation probabilities: find_best evaluates each, every pair and the three
    together, and keep-largest-component, and the inference instructions it writes reproduce the chosen result when
    run."""
    from samunet.training.trainer import run_training
    t, _ = trained
    res = hippo_env / "samunet_results" / NAME
    run_training(4, "2d", 0, head="cnn", epochs=2, iterations_per_epoch=10, num_labeled_cases=4, batch_size=8,
                 save_probabilities=True)
    run_training(4, "2d", 0, head="hybrid", num_labeled_cases=4, validation_only=True, save_probabilities=True,
                 batch_size=8, augmented_views=0)
    run_training(4, "2d", 0, head="linear", epochs=1, iterations_per_epoch=5, num_labeled_cases=4, batch_size=8,
                 save_probabilities=True)
    a, b = "samunetTrainer_hybrid_n4__samunetPlans__2d", "samunetTrainer_cnn_n4__samunetPlans__2d"
    c = "samunetTrainer_linear_n4__samunetPlans__2d"
    val_a, val_b = res / a / "fold_0" / "validation", res / b / "fold_0" / "validation"
    val_c = res / c / "fold_0" / "validation"
    # final validation resumes per case: after a case's output is lost, a rerun predicts that case alone
    summary = json.loads((val_a / "summary.json").read_text())
    lost, kept = t.val_ids[0], t.val_ids[1:]
    stamps = {c: (val_a / f"{c}.npz").stat().st_mtime_ns for c in kept}
    (val_a / f"{lost}.npz").unlink()
    run_training(4, "2d", 0, head="hybrid", num_labeled_cases=4, validation_only=True, save_probabilities=True,
                 batch_size=8, augmented_views=0)
    assert {c: (val_a / f"{c}.npz").stat().st_mtime_ns for c in kept} == stamps
    assert (val_a / f"{lost}.npz").is_file()
    assert json.loads((val_a / "summary.json").read_text())["foreground_mean"] == summary["foreground_mean"]

    r = run_entry("find_best_configuration_entry", "4", "-f", "0")
    assert r.returncode == 0, r.stderr
    assert "predictions are missing" not in r.stderr  # fold 0's cases are scored, the other folds' are not missed
    info = json.loads((res / "inference_information.json").read_text())
    ens = f"ensemble___{b}___{a}"  # members in sorted order
    triple = f"ensemble___{b}___{a}___{c}"
    assert set(info["results"]) == {a, b, c, ens, f"ensemble___{b}___{c}", f"ensemble___{a}___{c}", triple}
    # with one fold the cross-validation Dice of a model is its fold's final validation Dice
    for key, val in ((a, val_a), (b, val_b)):
        expected = json.loads((val / "summary.json").read_text())["foreground_mean"]["Dice"]
        assert info["results"][key] == pytest.approx(expected, abs=1e-9)
    assert info["best"] == max(info["results"], key=info["results"].get)
    # an ensemble is the arg-max of its members' averaged probabilities, case by case
    ens_folder = res / "crossval_results_folds_0" / ens
    for key, members in ((ens, (val_a, val_b)), (triple, (val_a, val_b, val_c))):
        for case in t.val_ids:
            total = 0
            for val in members:
                with np.load(val / f"{case}.npz") as z:
                    total = total + z["probabilities"].astype(np.float32)
            assert np.array_equal(_read(res / "crossval_results_folds_0" / key / f"{case}.nii.gz"),
                                  total.argmax(0)), (key, case)
    # post-processing: each foreground class alone (and all together); kept only where it helps
    trials = info["postprocessing_trials"]
    assert set(trials) == {"1_2", "1", "2"}
    kept = info["postprocessing"]["keep_largest_component"]
    if kept:
        assert info["foreground_dice_after_postprocessing"] > info["best_foreground_dice"]
    else:
        assert all(d <= info["best_foreground_dice"] + 1e-4 for d in trials.values())
    assert json.loads((res / "postprocessing.json").read_text()) == info["postprocessing"]

    # samunet_ensemble on the two validation folders gives the same label maps
    r = run_entry("ensemble_entry", "-i", val_a, val_b, "-o", tmp_path / "ens")
    assert r.returncode == 0, r.stderr
    for case in t.val_ids:
        assert np.array_equal(_read(tmp_path / "ens" / f"{case}.nii.gz"), _read(ens_folder / f"{case}.nii.gz"))

    # the written instructions run as they are (only the folders filled in) and reproduce the chosen result on one
    # of its cases
    cases = t.val_ids[:1]
    inp = tmp_path / "imagesTs"
    inp.mkdir()
    for c in cases:
        shutil.copy(HIPPO / "imagesTr" / f"{c}_0000.nii.gz", inp)
    text = (res / "inference_instructions.txt").read_text()
    commands = [line for line in text.splitlines() if line.startswith("samunet_")]
    assert any("-f 0" in c and f"$samunet_results/{NAME}/" in c for c in commands), text
    bindir = Path(sys.executable).parent
    script = "\n".join(
        str(bindir / c.replace("INPUT_FOLDER", str(inp)).replace("OUTPUT_FOLDER", str(tmp_path / "final")))
        + (" --disable_tta" if c.startswith("samunet_predict") else "") for c in commands)
    r = subprocess.run(["bash", "-euc", script], capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    final = tmp_path / ("final_PP" if kept else "final")
    chosen = res / "crossval_results_folds_0" / (f"postprocessing_{info['best']}" if kept else "") / \
        ("_".join(map(str, kept)) if kept else info["best"])
    for c in cases:  # cached float16 embeddings there, recomputed ones here: the same up to rounding
        assert (_read(final / f"{c}.nii.gz") == _read(chosen / f"{c}.nii.gz")).mean() > 0.995, c
    want = _recorded_dice(chosen / "summary.json", cases)
    assert _evaluate_cli(cases, final, tmp_path / "gt") == pytest.approx(want, abs=0.01)


def test_find_best_instructions_name_every_member_of_an_ensemble_and_refuse_a_size_below_two():
    from samunet.evaluation.find_best import _instructions, ensemble_key, ensemble_members
    members = [f"samunetTrainer_{h}_n1__samunetPlans__2d" for h in ("cnn", "hybrid", "linear")]
    assert ensemble_members(ensemble_key(members)) == members and ensemble_members(members[0]) == []
    text = _instructions(NAME, ensemble_key(members), ["0"], {"keep_largest_component": [1]})
    lines = [line for line in text.splitlines() if line.startswith("samunet_")]
    assert len(lines) == 5, text  # one prediction per member, the ensemble, the post-processing
    for i, m in enumerate(members, 1):
        assert f"-o OUTPUT_FOLDER_MODEL_{i} -m $samunet_results/{NAME}/{m} -f 0 --save_probabilities" in lines[i - 1]
    assert lines[3] == "samunet_ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 OUTPUT_FOLDER_MODEL_3 " \
                       "-o OUTPUT_FOLDER"
    assert lines[4].startswith("samunet_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP")
    r = run_entry("find_best_configuration_entry", "4", "-f", "0", "--max_ensemble_size", "1")
    assert r.returncode == 1 and "error: --max_ensemble_size 1: an ensemble averages at least 2" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_apply_postprocessing_removes_stray_components_only(trained, hippo_env, tmp_path):
    t, _ = trained
    val = t.output / "validation"
    case = t.val_ids[0]
    seg = _read(val / f"{case}.nii.gz")
    assert (seg == 1).any() and (seg == 2).any()
    from scipy import ndimage
    # a stray class-1 blob in a corner far from the hippocampus, as a second component
    stray = seg.copy()
    occupied = ndimage.binary_dilation(seg > 0, iterations=3)
    corner = (slice(0, 2), slice(0, 2), slice(0, 2))
    assert not occupied[corner].any()
    stray[corner] = 1
    inp = tmp_path / "in"
    inp.mkdir()
    img = sitk.GetImageFromArray(stray)
    img.CopyInformation(sitk.ReadImage(str(val / f"{case}.nii.gz")))
    sitk.WriteImage(img, str(inp / f"{case}.nii.gz"))
    shutil.copy(t.model_dir / "dataset.json", inp)
    pp = tmp_path / "postprocessing.json"
    pp.write_text(json.dumps({"keep_largest_component": [1]}))
    r = run_entry("apply_postprocessing_entry", "-i", inp, "-o", tmp_path / "out", "-pp_pkl_file", pp)
    assert r.returncode == 0, r.stderr
    out = _read(tmp_path / "out" / f"{case}.nii.gz")
    assert not out[corner].any()
    lab, n = ndimage.label(out == 1, ndimage.generate_binary_structure(3, 3))
    assert n == 1
    # class 2 untouched, class 1 reduced to its largest component of the original prediction
    assert np.array_equal(out == 2, seg == 2)
    lab0, _ = ndimage.label(seg == 1, ndimage.generate_binary_structure(3, 3))
    largest = np.argmax(np.bincount(lab0.ravel())[1:]) + 1
    assert np.array_equal(out == 1, lab0 == largest)
    a, b = sitk.ReadImage(str(inp / f"{case}.nii.gz")), sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
    assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


def test_cached_warp_keeps_image_label_and_embedding_aligned(trained):
    import torch
    import torch.nn.functional as F
    from samunet.preprocessing.encoder_inputs import encoder_inputs, make_layout, slice_images
    from samunet.training.cached_augmentation import (WarpParams, random_affine, region_centres, warp_grid,
                                                      warp_labels)
    from samunet.training.data import CachedData
    t, _ = trained
    data = CachedData(t.cache, t.train_ids, t.num_classes, canvas=64)
    rows = np.flatnonzero(data.sampler.presence.all(1))[::7][:6]  # slices holding both classes
    b = data.batch(rows)
    img, tgt = b["images"], b["target"]
    layouts = [data.items[data.index[r][0]][3]["layout"] for r in rows]
    theta = random_affine(np.random.default_rng(0), len(rows), region_centres(layouts),
                          WarpParams(p_rotation=1.0, p_scale=1.0, rotation_deg=30))
    assert not bool(__import__("samunet.training.cached_augmentation", fromlist=["x"]).is_identity(theta).any())
    # image and label: mark the labelled pixels in the image, warp both, the marks must land on the warped label
    marked = torch.where((tgt > 0)[:, None], torch.ones_like(img), img * 0.5)
    img_w, tgt_w = warp_grid(marked, theta), warp_labels(tgt, theta)
    assert set(torch.unique(tgt_w).tolist()) <= {-1, 0, 1, 2}
    bright, fg = img_w[:, 0] > 0.75, tgt_w > 0
    assert 2 * (bright & fg).sum() / (bright.sum() + fg.sum()) > 0.9
    # the same map on the 32 x 32 embedding grid: the label warped there matches the warped label averaged to it
    grid = lambda m: F.interpolate(m[:, None].float(), size=(32, 32), mode="area")  # noqa: E731
    on_grid = warp_grid(grid(tgt > 0), theta)
    assert torch.corrcoef(torch.stack([on_grid.flatten(), grid(fg).flatten()]))[0, 1] > 0.9
    # the real cached embedding: warped, it is closer to the embedding of the warped slice than left unwarped
    # (compared inside the slice, as benchmarks/embedding_warp.py does)
    xs, regions = [], []
    for r in rows:
        ci, k = data.index[r]
        case_data = data.items[ci][4][0]
        layout = make_layout(case_data.shape[2:], t.config)
        xs.append(encoder_inputs(slice_images(case_data, int(data.items[ci][3]["rows"][k][0]), t.config), layout)[0])
        region = torch.zeros(1, 1, layout["size"], layout["size"])
        region[..., :layout["resized"][0], :layout["resized"][1]] = 1
        regions.append(F.interpolate(region, size=(32, 32), mode="area"))
    x, regions = torch.cat(xs), torch.cat(regions)
    theta15 = random_affine(np.random.default_rng(1), len(rows), region_centres(layouts),
                            WarpParams(p_rotation=1.0, p_scale=0.0, rotation_deg=15))
    with torch.no_grad():
        target = t.encoder(warp_grid(x, theta15)).float()
    inside = ((regions > 0.99) & (warp_grid(regions, theta15) > 0.99))[:, 0]
    warped = F.cosine_similarity(warp_grid(b["emb"], theta15), target, dim=1)[inside].mean()
    unwarped = F.cosine_similarity(b["emb"], target, dim=1)[inside].mean()
    assert warped > unwarped + 0.03, (float(warped), float(unwarped))


def test_early_stopping_stops_at_the_plateau_and_resumes_after_a_kill(trained, hippo_env, tmp_path):
    from samunet.models.run_checkpoint import load_checkpoint
    base = hippo_env / "samunet_results" / NAME
    # a linear head with one step of 2 slices per epoch stays at background for a while: its moving-average
    # pseudo-Dice does not improve, so patience 3 stops it long before the 40-epoch cap, after a 2-epoch cool-down
    args = ["--head", "linear", "--num_labeled_cases", "2", "--epochs", "40", "--iterations_per_epoch", "1",
            "--batch_size", "2", "--patience", "3", "--cooldown", "2"]
    r = _train("--head", "linear", "--num_labeled_cases", "2", "--cooldown", "-1")
    assert r.returncode == 1 and "error: --cooldown -1: must be 0 or more epochs" in r.stderr
    assert "Traceback" not in r.stderr
    r = _train(*args)
    assert r.returncode == 0, r.stderr
    out = base / "samunetTrainer_linear_n2__samunetPlans__2d" / "fold_0"
    ref = load_checkpoint(out / "checkpoint_final.pth")
    stopped = ref["log"]["stopped_early_after_epoch"]
    assert 4 <= stopped < 40 and ref["epoch"] == stopped and "early stopping" in r.stderr
    cool, lr = ref["log"]["cooldown"], ref["log"]["lr"]
    assert cool["epochs"] == 2 and cool["from_epoch"] + 2 == stopped and "cooling down" in r.stderr
    assert cool["start_lr"] == lr[cool["from_epoch"] - 1] == lr[cool["from_epoch"]] > lr[-1] > 0  # falls towards 0
    reference = out.parent.parent / "reference"
    shutil.move(str(out.parent), reference)
    proc = subprocess.Popen(TRAIN + ["4", "2d", "0", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoint_latest.pth"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_file() and load_checkpoint(latest)["epoch"] >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint_final.pth").exists(), "training finished before it could be killed"
    epochs_done = load_checkpoint(latest)["epoch"]
    r = _train(*args)
    assert r.returncode == 1 and "--c" in r.stderr  # no silent overwrite of an unfinished run
    r = _train(*args, "--c")
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoint_latest.pth after epoch {epochs_done}" in r.stderr
    state = load_checkpoint(out / "checkpoint_final.pth")
    assert state["epoch"] == stopped and state["log"]["stopped_early_after_epoch"] == stopped
    assert state["log"]["lr"] == lr and state["log"]["cooldown"] == cool
    assert state["log"]["pseudo_dice"] == ref["log"]["pseudo_dice"]  # the same batches, the same plateau
    assert (out / "validation" / "summary.json").is_file() and not latest.exists()
    # a foreign checkpoint put in place of a fold's checkpoint stops --val with a clear message
    target = base / "samunetTrainer_hybrid_n4__samunetPlans__2d" / "fold_0"
    backup = tmp_path / "backup.pth"
    shutil.copyfile(target / "checkpoint_final.pth", backup)
    try:
        shutil.copyfile(out / "checkpoint_final.pth", target / "checkpoint_final.pth")
        r = _train("--head", "hybrid", "--num_labeled_cases", "4", "--val")
        assert r.returncode == 1 and "does not belong to this run" in r.stderr and "head is 'linear'" in r.stderr
    finally:
        shutil.copyfile(backup, target / "checkpoint_final.pth")


def test_augmented_views_hold_the_exact_embeddings_of_aligned_warped_slices(trained, tmp_path):
    import types
    import torch
    import torch.nn.functional as F
    from samunet.preprocessing.encoder_inputs import make_layout
    from samunet.training.augmented_views import AugmentedViews, views_for
    t, _ = trained
    assert views_for(34) == 64 and views_for(180) == 22 and views_for(700) == 5 and views_for(7000) == 0
    ident = t.train_ids[0]
    src = t.cache.data_folder
    # a real case whose labelled voxels are marked in the image, so alignment can be read off the stored views
    data, seg = np.load(src / f"{ident}.npy"), np.load(src / f"{ident}_seg.npy")
    middle = int(np.median(np.flatnonzero((seg > 0).any(axis=(1, 2)))))
    data, seg = data[:, middle - 4:middle + 4], seg[middle - 4:middle + 4]  # 8 labelled slices: 16 encoder calls
    np.save(tmp_path / f"{ident}.npy", np.where(seg[None] > 0, 1.0, 0.5 * data).astype(np.float32))
    np.save(tmp_path / f"{ident}_seg.npy", seg)
    cache = types.SimpleNamespace(config=t.config, data_folder=tmp_path, label_values=t.label_values,
                                  folder=tmp_path / "cache")
    views = AugmentedViews(cache, canvas=64, views=2, seed=3)
    assert views.build([ident], t.encoder) == 2 * data.shape[1] and views.is_done(ident)
    assert views.build([ident], t.encoder) == 0  # resumable: nothing is encoded twice
    emb, tgt, img, info = views.load(ident)
    assert emb.shape == (2 * data.shape[1], 256, 32, 32) and img.shape == (2 * data.shape[1], 3, 64, 64)
    img, tgt = torch.from_numpy(np.asarray(img, np.float32)), torch.from_numpy(np.asarray(tgt, np.int64))
    bright, fg = img[:, 0] > 0.75, tgt > 0
    assert fg.sum() > 100 and 2 * (bright & fg).sum() / (bright.sum() + fg.sum()) > 0.85
    # each stored embedding is the encoder's embedding of that very view (re-encoded from the stored canvas image)
    rows = np.flatnonzero(fg.flatten(1).any(1).numpy())[:4]
    p = t.config["encoder_input_size"]
    x = F.interpolate(img[rows], size=(p, p), mode="bilinear", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        again = t.encoder(x).float()
    stored = torch.from_numpy(np.asarray(emb[rows], np.float32))
    same = F.cosine_similarity(again, stored, dim=1).mean()
    other = F.cosine_similarity(again, stored.roll(1, 0), dim=1).mean()
    assert same > 0.9 and same > other + 0.05, (float(same), float(other))
    assert make_layout(data.shape[2:], {**t.config, "encoder_input_size": 64}) == info["layout"]
    assert not list(views.folder.glob(".*"))  # the views were written under a temporary name, renamed when complete
    # the same seed gives the same views: the intensity transforms (the noise's variance comes from Python's random,
    # the rest from numpy's) repeat exactly, on 64 real slices, where about 6 draw noise
    from samunet.training.cached_augmentation import intensity_augmentation, seed_intensity_augmentation
    slices = np.repeat(np.load(src / f"{ident}.npy")[:, middle - 4:middle + 4].swapaxes(0, 1), 8, 0)
    transform, out = intensity_augmentation(), []
    for seed in (5, 5, 6):
        seed_intensity_augmentation(seed)
        out.append(transform(data=np.array(slices, dtype=np.float32))["data"])
    assert np.array_equal(out[0], out[1]) and not np.array_equal(out[0], out[2])


def test_embedding_context_fuses_the_cached_embeddings_of_neighbouring_slices(trained, hippo_env, tmp_path):
    from samunet.plan_and_preprocess import plan_and_preprocess
    from samunet.training.data import CachedData
    from samunet.training.trainer import run_training
    t2d, _ = trained
    plan_and_preprocess(4, num_processes=2, configurations=["2d", "2.5d_emb"])
    emb_root = hippo_env / "samunet_preprocessed" / NAME / "embeddings"
    before = sorted(p.name for p in emb_root.iterdir())
    t = run_training(4, "2.5d_emb", 0, head="linear", epochs=3, iterations_per_epoch=6, num_labeled_cases=4,
                     batch_size=8, patience=0)
    assert t.cache.folder == t2d.cache.folder  # the 2d cache serves it: nothing was encoded again
    assert sorted(p.name for p in emb_root.iterdir()) == before
    assert t.config["embedding_context"] == 3 and t.head.fusion.conv.in_channels == 3 * 256
    # a row's input is the cached embeddings of slices s-1, s, s+1 of its case (the edge slice repeated)
    data = CachedData(t.cache, t.train_ids[:1], t.num_classes)
    emb = np.asarray(t.cache.load(t.train_ids[0])[0], np.float32)
    for k in (0, 5, len(emb) - 1):
        want = np.concatenate([emb[max(k - 1, 0)], emb[k], emb[min(k + 1, len(emb) - 1)]])
        assert np.array_equal(data.batch([k])["emb"][0].numpy(), want)
    # prediction gathers the same neighbours from freshly computed embeddings
    case = t.val_ids[0]
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(HIPPO / "imagesTr" / f"{case}_0000.nii.gz", inp)
    r = run_entry("predict_entry", "-i", inp, "-o", tmp_path / "out", "-d", "4", "-c", "2.5d_emb", "-f", "0",
                  "--head", "linear", "--num_labeled_cases", "4", "--disable_tta")
    assert r.returncode == 0, r.stderr
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(t.output / "validation" / f"{case}.nii.gz")))
    assert (a == b).mean() > 0.995


def test_without_the_cache_the_fallback_head_learns_from_slices_encoded_on_the_fly(hippo20, tmp_path):
    """``--no_cache`` (or a plan whose embeddings do not fit the disk): the plans' hybrid head needs the cache, so the
    fallback head for embeddings computed on the fly (CNN) trains on augmented slices that the frozen encoder encodes
    at every step, and its validation loss falls. (Prediction with the encoder on the fly: hippo_cli_prediction.)"""
    from conftest import use_folders
    from samunet.training.trainer import Trainer
    with use_folders(hippo20, tmp_path):
        t = Trainer(4, "2d", 0, num_labeled_cases=4, use_cache=False, epochs=3, iterations_per_epoch=10, batch_size=8)
        t.initialize()
        assert t.head_name == "cnn" and t.use_cache is False and t.encoder is not None
        before, _ = t.validate_epoch()
        train_losses = []
        for t.epoch in range(3):
            train_losses.append(t.train_epoch())
        after, _ = t.validate_epoch()
    print(f"on-the-fly cnn: validation loss {before:.3f} -> {after:.3f}, training losses {train_losses}")
    assert after < before - 0.1 and train_losses[-1] < train_losses[0]
