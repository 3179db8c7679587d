import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from conftest import DRIVE, HIPPO, hippo_cases, require
from samunet.dataset.io import read_seg, write_seg
from samunet.evaluation.evaluate import evaluate_folder, evaluate_simple
from samunet.evaluation.metrics import (compute_binary_metrics, compute_metrics, hd95, image_diagonal,
                                        mean_metrics, normalized_surface_distance)
from samunet.utils import SamunetError, load_json

REPO = Path(__file__).resolve().parents[1]


def box(shape, *slices):
    m = np.zeros(shape, bool)
    m[tuple(slices)] = True
    return m


# ---------------------------------------------------------------- metrics on small masks, expected values by hand

def test_dice_iou_counts_by_hand():
    # ref: 2x2 block at rows 1-2, cols 1-2 (4 px); pred: 2x3 block at rows 1-2, cols 2-4 (6 px)
    # overlap: rows 1-2, col 2 -> TP = 2; FP = 6 - 2 = 4; FN = 4 - 2 = 2; TN = 36 - 8 = 28
    # Dice = 2*2 / (2*2 + 4 + 2) = 4/10 = 0.4; IoU = 2 / (2 + 4 + 2) = 0.25
    ref = box((6, 6), slice(1, 3), slice(1, 3))
    pred = box((6, 6), slice(1, 3), slice(2, 5))
    m = compute_binary_metrics(ref, pred)
    assert (m["TP"], m["FP"], m["FN"], m["TN"], m["n_ref"], m["n_pred"]) == (2, 4, 2, 28, 4, 6)
    assert m["Dice"] == pytest.approx(0.4)
    assert m["IoU"] == pytest.approx(0.25)


def test_labels_are_evaluated_separately():
    # ref  = [[1, 1, 2, 0]],  pred = [[1, 2, 2, 2]]
    # label 1: TP 1, FP 0, FN 1 -> Dice 2/3, IoU 1/2; label 2: TP 1, FP 2, FN 0 -> Dice 2/4, IoU 1/3
    ref = np.array([[1, 1, 2, 0]])
    pred = np.array([[1, 2, 2, 2]])
    m = compute_metrics(ref, pred, [1, 2])
    assert list(m) == ["1", "2"]
    assert m["1"]["Dice"] == pytest.approx(2 / 3) and m["1"]["IoU"] == pytest.approx(0.5)
    assert m["2"]["Dice"] == pytest.approx(0.5) and m["2"]["IoU"] == pytest.approx(1 / 3)


def test_ignore_label_is_left_out():
    # ref = [[1, 1, 3, 0]], pred = [[1, 0, 1, 1]], ignore label 3 (pixel 2 is not counted)
    # label 1: TP pixel 0, FN pixel 1, FP pixel 3 -> Dice 2/4 = 0.5, TN 3 - 3 = 0
    m = compute_metrics(np.array([[1, 1, 3, 0]]), np.array([[1, 0, 1, 1]]), [1], ignore_label=3)["1"]
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (1, 1, 1, 0)
    assert m["Dice"] == pytest.approx(0.5)


def test_shift_along_coarse_axis_is_two_mm():
    # ref: rows 2-3, cols 2-4 of an 8x8 grid; every voxel of a 2-row block is a surface voxel.
    # spacing (2.0, 1.0): one row = 2 mm, one column = 1 mm.
    ref = box((8, 8), slice(2, 4), slice(2, 5))
    # shifted down one row: the shared row 3 is at distance 0, rows 2 and 4 are 2 mm from the other surface
    # directed distances: [0, 0, 0, 2, 2, 2] both ways -> 95th percentile (index 4.75 between 2 and 2) = 2 mm
    # NSD at 1 mm: 3 of 6 + 3 of 6 within tolerance -> 6/12 = 0.5; at 2 mm: all -> 1
    down = np.roll(ref, 1, axis=0)
    m = compute_binary_metrics(ref, down, spacing=(2.0, 1.0), nsd_tolerance_mm=1.0)
    assert m["HD95"] == pytest.approx(2.0)
    assert m["NSD"] == pytest.approx(0.5)
    assert m["Dice"] == pytest.approx(0.5)  # TP 3, FP 3, FN 3 -> 6/12
    assert normalized_surface_distance(ref, down, (2.0, 1.0), tolerance_mm=2.0) == pytest.approx(1.0)
    # the same shift along the fine axis is 1 mm: HD95 1, NSD at 1 mm = 1
    right = np.roll(ref, 1, axis=1)
    assert hd95(ref, right, (2.0, 1.0)) == pytest.approx(1.0)
    assert normalized_surface_distance(ref, right, (2.0, 1.0), 1.0) == pytest.approx(1.0)
    # isotropic spacing: the shift down is 1 mm
    assert hd95(ref, down) == pytest.approx(1.0)


def test_nested_blocks_anisotropic_by_hand():
    # ref: 5x5 block (rows/cols 1-5) -> 16 surface voxels (the ring), centre 3x3 is interior
    # pred: 3x3 block (rows/cols 2-4) -> 8 surface voxels (its centre is interior); spacing (2.0, 1.0)
    ref = box((7, 7), slice(1, 6), slice(1, 6))
    pred = box((7, 7), slice(2, 5), slice(2, 5))
    # pred ring -> ref ring: the 4 corners and the 2 side middles are 1 mm from the ring's side columns;
    #   top and bottom middles are 2 mm (one row up/down, or two columns sideways) -> [1,1,1,1,1,1,2,2]
    #   95th percentile: index 0.95*7 = 6.65 between 2 and 2 -> 2
    # ref ring -> pred ring: 6 side voxels at 1 mm (one column); top/bottom rows: 6 non-corner voxels at 2 mm
    #   (one row), 4 corners at sqrt(2^2 + 1^2) = sqrt(5) -> [1]*6 + [2]*6 + [sqrt5]*4
    #   95th percentile: index 0.95*15 = 14.25 between sqrt5 and sqrt5 -> sqrt(5) = 2.2360680
    # HD95 = max(2, sqrt5) = sqrt5
    # NSD@1mm: (6 + 6) / (16 + 8) = 0.5; NSD@2mm: (12 + 8) / 24 = 5/6; NSD@2.5mm: 1
    # Dice: TP 9, FP 0, FN 16 -> 18/34 = 9/17; IoU 9/25
    m = compute_binary_metrics(ref, pred, spacing=(2.0, 1.0), nsd_tolerance_mm=1.0)
    assert m["HD95"] == pytest.approx(math.sqrt(5))
    assert m["NSD"] == pytest.approx(0.5)
    assert normalized_surface_distance(ref, pred, (2.0, 1.0), 2.0) == pytest.approx(5 / 6)
    assert normalized_surface_distance(ref, pred, (2.0, 1.0), 2.5) == pytest.approx(1.0)
    assert m["Dice"] == pytest.approx(9 / 17) and m["IoU"] == pytest.approx(9 / 25)


def test_3d_shift_along_thick_slices():
    # 3x3x3 cube (z, y, x 2-4) with spacing (3, 1, 1), prediction shifted by one slice in z
    # ref surface: 26 voxels (all but the centre). Distances to the shifted cube's surface:
    #   z=2 face (9 voxels): 3 mm; z=3 (8 surface voxels): inside the other's bottom face -> 0;
    #   z=4 face: 8 voxels on the other's surface -> 0, its centre (4,3,3) is the other's interior voxel,
    #   1 mm from its neighbour (4,3,2) -> sorted [0]*16 + [1] + [3]*9, 95th (index 23.75) = 3
    # the other direction is the mirror image -> HD95 = 3 mm; NSD@1mm = (17 + 17) / (26 + 26) = 17/26
    ref = box((8, 8, 8), slice(2, 5), slice(2, 5), slice(2, 5))
    pred = np.roll(ref, 1, axis=0)
    m = compute_binary_metrics(ref, pred, spacing=(3.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    assert m["HD95"] == pytest.approx(3.0)
    assert m["NSD"] == pytest.approx(17 / 26)


def test_hd95_percentile_ignores_a_single_outlier():
    # ref: a line of n voxels (row 5); pred: the same line plus one voxel 10 mm away at (15, 0)
    # pred -> ref distances: [0]*n + [10]; ref -> pred: all 0
    # n = 40: 95th percentile index 0.95*40 = 38 -> 0 (the outlier is the top 1/41)
    # n = 9:  index 0.95*9 = 8.55 -> 0 + 0.55*(10 - 0) = 5.5 (numpy's linear interpolation)
    for n, expected in ((40, 0.0), (9, 5.5)):
        ref = box((20, n), slice(5, 6), slice(0, n))
        pred = ref.copy()
        pred[15, 0] = True
        assert hd95(ref, pred) == pytest.approx(expected)
        # Dice: 2n / (n + n + 1); n = 40 -> 80/81
        assert compute_binary_metrics(ref, pred)["Dice"] == pytest.approx(2 * n / (2 * n + 1))


def test_empty_masks_conventions():
    shape, spacing = (8, 6), (2.0, 1.0)
    empty = np.zeros(shape, bool)
    some = box(shape, slice(2, 4), slice(2, 4))
    both = compute_binary_metrics(empty, empty, spacing)
    assert all(math.isnan(both[k]) for k in ("Dice", "IoU", "HD95", "NSD"))
    assert (both["TP"], both["FP"], both["FN"], both["TN"]) == (0, 0, 0, 48)
    # field of view: 8 rows * 2 mm = 16 mm by 6 cols * 1 mm = 6 mm -> diagonal sqrt(256 + 36) = sqrt(292)
    diag = math.sqrt(292)
    assert image_diagonal(shape, spacing) == pytest.approx(diag)
    ref_empty = compute_binary_metrics(empty, some, spacing)  # false positive only
    pred_empty = compute_binary_metrics(some, empty, spacing)  # missed structure
    for m in (ref_empty, pred_empty):
        assert m["Dice"] == 0 and m["IoU"] == 0 and m["NSD"] == 0
        assert m["HD95"] == pytest.approx(diag)
    assert (ref_empty["FP"], ref_empty["FN"], pred_empty["FP"], pred_empty["FN"]) == (4, 0, 0, 4)


def test_dummy_axis_of_2d_images_is_ignored():
    # a natural 2D image is read as (1, Y, X) with spacing 999 on the dummy axis: same result as plain 2D
    ref = box((7, 7), slice(1, 6), slice(1, 6))
    pred = box((7, 7), slice(2, 5), slice(2, 5))
    flat = compute_binary_metrics(ref, pred, (1.0, 1.0))
    lifted = compute_binary_metrics(ref[None], pred[None], (999.0, 1.0, 1.0))
    for k in flat:
        assert lifted[k] == pytest.approx(flat[k])
    # diagonal of a 7x7 image, the dummy axis left out
    assert image_diagonal((1, 7, 7), (999.0, 1.0, 1.0)) == pytest.approx(math.sqrt(98))


def test_means_ignore_nan():
    # class 1: Dice 1.0 (case a), NaN (case b, both empty) -> mean 1.0
    # class 2: Dice 0.5 (case a), 0.0 (case b) -> mean 0.25; foreground mean = (1.0 + 0.25) / 2 = 0.625
    # HD95 class 1: 0 and NaN -> 0. Class 2, case a: the 2-px segment at cols 3-4 vs cols 4-5; the (1, 8)
    # array is a 1D line (dummy axis left out), both pixels of a segment are surface, directed distances [1, 0]
    # each way -> 95th percentile 0 + 0.95 * (1 - 0) = 0.95; case b: missed -> diagonal of a line of 8 px = 8
    ref_a = np.array([[1, 1, 0, 2, 2, 0, 0, 0]])
    pred_a = np.array([[1, 1, 0, 0, 2, 2, 0, 0]])
    ref_b = np.array([[0, 0, 0, 0, 2, 2, 0, 0]])
    pred_b = np.zeros((1, 8), int)
    cases = [compute_metrics(ref_a, pred_a, [1, 2]), compute_metrics(ref_b, pred_b, [1, 2])]
    assert math.isnan(cases[1]["1"]["Dice"])
    mean, fg = mean_metrics(cases, [1, 2])
    assert mean["1"]["Dice"] == pytest.approx(1.0)
    assert mean["2"]["Dice"] == pytest.approx(0.25)
    assert fg["Dice"] == pytest.approx(0.625)
    assert mean["1"]["HD95"] == pytest.approx(0.0)
    assert cases[0]["2"]["HD95"] == pytest.approx(0.95)
    assert mean["2"]["HD95"] == pytest.approx((0.95 + 8) / 2)
    # a class that is empty everywhere has NaN means and is left out of the foreground mean
    mean, fg = mean_metrics([cases[1]], [1, 2])
    assert math.isnan(mean["1"]["Dice"]) and fg["Dice"] == pytest.approx(0.0)


def _brute_force_hd95(ref, pred, spacing):
    def surface_points(m):
        p = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(m.ndim):
            for step in (-1, 1):
                inner &= np.roll(p, step, axis)[tuple(slice(1, -1) for _ in range(m.ndim))]
        return np.argwhere(m & ~inner) * np.asarray(spacing)
    a, b = surface_points(ref), surface_points(pred)
    d = cdist(a, b)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_matches_brute_force_on_a_real_case_with_anisotropic_spacing():
    seg, _ = read_seg(require(HIPPO) / "labelsTr" / f"{hippo_cases(1)[0]}.nii.gz")
    ref = seg == 1
    pred = ndimage.binary_dilation(ndimage.binary_erosion(ref), iterations=2)
    pred[: seg.shape[0] // 3] = False
    spacing = (2.0, 1.0, 0.7)
    assert hd95(ref, pred, spacing) == pytest.approx(_brute_force_hd95(ref, pred, spacing))


def test_hd95_matches_brute_force_on_random_masks_touching_the_border():
    rng = np.random.default_rng(0)
    for _ in range(10):
        shape = tuple(int(n) for n in rng.integers(2, 10, size=3))
        a, b = rng.random(shape) > 0.5, rng.random(shape) > 0.7
        a[0, 0, 0] = b[-1, -1, -1] = True
        spacing = tuple(rng.uniform(0.3, 3.0, size=3))
        assert hd95(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing))


# ---------------------------------------------------------------- folders of real label maps

def _hippo_gt(tmp_path, n=4) -> Path:
    gt = tmp_path / "gt"
    gt.mkdir()
    for c in hippo_cases(n):
        shutil.copy(HIPPO / "labelsTr" / f"{c}.nii.gz", gt)
    return gt


def _eroded_copy(gt: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in sorted(gt.iterdir()):
        seg, props = read_seg(f)
        out = np.zeros_like(seg)
        for label in (1, 2):
            out[ndimage.binary_erosion(seg == label)] = label
        write_seg(out, props, dst / f.name)
    return dst


def test_real_hippocampus_against_itself_and_an_eroded_copy(tmp_path):
    gt = _hippo_gt(tmp_path)
    same = evaluate_folder(gt, gt, [1, 2], ".nii.gz", num_processes=1, output_file=tmp_path / "self.json")
    for label in ("1", "2"):
        assert same["mean"][label]["Dice"] == 1.0 and same["mean"][label]["HD95"] == 0.0
        assert same["mean"][label]["NSD"] == 1.0
    assert same["foreground_mean"]["Dice"] == 1.0

    pred = _eroded_copy(gt, tmp_path / "pred")
    summary = evaluate_folder(gt, pred, [1, 2], ".nii.gz", num_processes=2)
    assert (pred / "summary.json").is_file()
    assert load_json(pred / "summary.json") == json.loads(json.dumps(summary))
    assert len(summary["metric_per_case"]) == 4
    for case in summary["metric_per_case"]:
        ref, _ = read_seg(case["reference_file"])
        prd, _ = read_seg(case["prediction_file"])
        assert Path(case["reference_file"]).name == Path(case["prediction_file"]).name
        for label in (1, 2):
            a, b = ref == label, prd == label
            direct = 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())
            m = case["metrics"][str(label)]
            assert m["Dice"] == pytest.approx(direct)
            assert m["Dice"] < 1 and 0 < m["HD95"] and 0 < m["NSD"] <= 1
            assert m["n_ref"] == a.sum() and m["n_pred"] == b.sum() and m["FP"] == 0  # erosion only removes
    dice = [[c["metrics"][k]["Dice"] for c in summary["metric_per_case"]] for k in ("1", "2")]
    assert summary["mean"]["1"]["Dice"] == pytest.approx(np.mean(dice[0]))
    assert summary["foreground_mean"]["Dice"] == pytest.approx((np.mean(dice[0]) + np.mean(dice[1])) / 2)


def test_postprocessing_choice_on_real_labels_single_and_two_classes(tmp_path):
    """find-best's keep-largest-component rule: kept for the class whose spurious blob it removes, for a data set
    with one foreground class too, and not for a class where it changes nothing."""
    from samunet.evaluation.ensemble_postprocess import choose_postprocessing
    gt2 = _hippo_gt(tmp_path, n=3)
    gt1, pred1, pred2 = (tmp_path / n for n in ("gt1", "pred1", "pred2"))
    for d in (gt1, pred1, pred2):
        d.mkdir()
    for f in sorted(gt2.iterdir()):
        seg, props = read_seg(f)
        fg = (seg > 0).astype(seg.dtype)
        assert ndimage.label(fg[0] if fg.shape[0] == 1 else fg, np.ones((3, 3, 3)))[1] == 1, f.name
        blob = np.zeros_like(seg)
        blob.reshape(-1)[:2] = 1  # two voxels in a corner, far from the hippocampus
        assert not (blob & fg).any()
        write_seg(fg, props, gt1 / f.name)
        write_seg(np.maximum(fg, blob), props, pred1 / f.name)
        write_seg(np.where(blob > 0, 2, seg).astype(seg.dtype), props, pred2 / f.name)  # a blob of class 2 only
    one = choose_postprocessing(pred1, gt1, [1], ".nii.gz", tmp_path / "w1")
    assert one["keep_largest_component"] == [1] and set(one["trials"]) == {"1"}
    assert one["mean_foreground_dice_before"] < 1 and one["mean_foreground_dice"] == 1.0
    two = choose_postprocessing(pred2, gt2, [1, 2], ".nii.gz", tmp_path / "w2")
    assert set(two["trials"]) == {"1_2", "1", "2"}
    assert two["trials"]["1"] == two["mean_foreground_dice_before"] < two["trials"]["2"] == two["trials"]["1_2"]
    assert two["keep_largest_component"] == [2] and two["dice_per_class"]["2"] == 1.0  # class 1: no change
    same = choose_postprocessing(gt1, gt1, [1], ".nii.gz", tmp_path / "w3")
    assert same["keep_largest_component"] == [] and same["mean_foreground_dice"] == 1.0
    assert sorted(p.name for p in pred1.iterdir()) == sorted(p.name for p in gt1.iterdir())  # input untouched


def test_real_drive_pngs_with_an_empty_prediction(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    names = ["DRIVE_21.png", "DRIVE_22.png", "DRIVE_23.png"]
    for n in names:
        shutil.copy(require(DRIVE) / "labelsTr" / n, gt)
        shutil.copy(DRIVE / "labelsTr" / n, pred)
    seg, props = read_seg(gt / names[2])
    write_seg(np.zeros_like(seg), props, pred / names[2])  # the vessels of one image are missed entirely
    summary = evaluate_simple(gt, pred, [1], num_processes=1)  # file ending found in the folder
    per_case = {Path(c["reference_file"]).name: c["metrics"]["1"] for c in summary["metric_per_case"]}
    assert per_case[names[0]]["Dice"] == 1.0 and per_case[names[0]]["HD95"] == 0.0
    missed = per_case[names[2]]
    # 584 x 565 pixels of 1 "mm": HD95 of a missed structure is the image diagonal
    assert missed["Dice"] == 0.0 and missed["NSD"] == 0.0
    assert missed["HD95"] == pytest.approx(math.hypot(584, 565))
    assert summary["mean"]["1"]["Dice"] == pytest.approx(2 / 3)
    assert summary["settings"]["file_ending"] == ".png"


def test_missing_prediction_is_named_and_chill_evaluates_the_rest(tmp_path):
    gt = _hippo_gt(tmp_path, 3)
    pred = tmp_path / "pred"
    shutil.copytree(gt, pred)
    missing = sorted(pred.iterdir())[1]
    missing.unlink()
    with pytest.raises(SamunetError, match=missing.name):
        evaluate_folder(gt, pred, [1, 2], ".nii.gz", num_processes=1)
    assert not (pred / "summary.json").exists()
    summary = evaluate_folder(gt, pred, [1, 2], ".nii.gz", num_processes=1, chill=True)
    assert len(summary["metric_per_case"]) == 2
    assert summary["settings"]["missing_predictions"] == [missing.name]
    assert summary["foreground_mean"]["Dice"] == 1.0


def test_shape_mismatch_names_the_file(tmp_path):
    gt = _hippo_gt(tmp_path, 2)
    pred = tmp_path / "pred"
    shutil.copytree(gt, pred)
    bad = sorted(pred.iterdir())[0]
    seg, props = read_seg(bad)
    cropped = seg[:, :-2]
    write_seg(cropped, dict(props, shape=list(cropped.shape)), bad)
    with pytest.raises(SamunetError, match=f"{bad.name}.*shape"):
        evaluate_folder(gt, pred, [1, 2], ".nii.gz", num_processes=1)


# ---------------------------------------------------------------- command line

def _run(entry, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = f"from samunet.evaluation.cli import {entry} as m; m()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO)


def test_cli_evaluate_folder_and_simple(tmp_path):
    gt = _hippo_gt(tmp_path, 2)
    pred = _eroded_copy(gt, tmp_path / "pred")
    out = tmp_path / "out" / "summary.json"
    r = _run("evaluate_folder_entry", gt, pred, "-djfile", HIPPO / "dataset.json", "-o", out, "-np", "1")
    assert r.returncode == 0, r.stderr
    summary = load_json(out)
    assert set(summary["mean"]) == {"1", "2"}  # foreground labels of dataset.json
    assert 0 < summary["foreground_mean"]["Dice"] < 1

    plans = tmp_path / "samunetPlans.json"
    plans.write_text(json.dumps({"file_ending": ".nii.gz"}))
    dj = tmp_path / "dj.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "Anterior": 1, "Posterior": 2}}))  # no file_ending
    r = _run("evaluate_folder_entry", gt, pred, "-djfile", dj, "-pfile", plans, "-o", tmp_path / "s2.json")
    assert r.returncode == 0, r.stderr
    assert load_json(tmp_path / "s2.json")["mean"] == summary["mean"]

    r = _run("evaluate_simple_entry", gt, pred, "-l", "2", "--nsd_tolerance", "2")
    assert r.returncode == 0, r.stderr
    simple = load_json(pred / "summary.json")
    assert list(simple["mean"]) == ["2"] and simple["settings"]["nsd_tolerance_mm"] == 2.0
    assert simple["mean"]["2"]["Dice"] == pytest.approx(summary["mean"]["2"]["Dice"])

    first = sorted(pred.glob("*.nii.gz"))[0]
    first.unlink()
    r = _run("evaluate_folder_entry", gt, pred, "-djfile", HIPPO / "dataset.json", "-o", out)
    assert r.returncode == 1 and "error:" in r.stderr and first.name in r.stderr
    assert "Traceback" not in r.stderr
    r = _run("evaluate_folder_entry", gt, pred, "-djfile", HIPPO / "dataset.json", "-o", out, "--chill")
    assert r.returncode == 0, r.stderr
    assert len(load_json(out)["metric_per_case"]) == 1
