"""Fingerprint, planner and preprocessing on the real data sets."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DRIVE, EM, HIPPO, copy_dataset, hippo_cases, tree_snapshot
from samunet.dataset.io import read_seg, write_seg
from samunet.plan_and_preprocess import extract_fingerprint, plan, plan_and_preprocess, preprocess
from samunet.preprocessing.preprocessor import preprocess_case, revert_seg
from samunet.utils import SamunetError

CLI = [sys.executable, "-c", "from samunet.cli import plan_and_preprocess_entry as m; m()"]


def _plans(samunet_dirs, name):
    return json.loads((samunet_dirs["samunet_preprocessed"] / name / "samunetPlans.json").read_text())


def test_hippocampus_cli_plans_preprocesses_and_resumes(samunet_dirs, caplog, monkeypatch):
    cases = hippo_cases(20)
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], cases)
    r = subprocess.run(CLI + ["-d", "4", "--verify_dataset_integrity", "-np", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pp = samunet_dirs["samunet_preprocessed"] / "Dataset004_Hippocampus"
    plans = _plans(samunet_dirs, "Dataset004_Hippocampus")
    assert set(plans["configurations"]) == {"2d", "2.5d", "2.5d_emb"}
    cfg = plans["configurations"]["2d"]
    fp = json.loads((pp / "dataset_fingerprint.json").read_text())
    median_shape = np.median(np.array(fp["shapes_after_crop"]), 0)
    # 1 mm isotropic: the tie between axes is broken towards the shortest axis (largest slices)
    assert "isotropic" in cfg["slice_axis_reason"]
    assert median_shape[cfg["slice_axis"]] == median_shape.min()
    assert cfg["target_spacing_inplane"] == [1.0, 1.0]
    assert cfg["encoder_input_size"] == 128 and cfg["inplane_mode"] == "resize"
    assert cfg["normalization"][0]["scheme"] == "percentile_clip"
    assert cfg["head"] == "hybrid" and cfg["cache_embeddings"] is True and "0.803" in cfg["head_reason"]
    # augmented views: the plateau study's budget (64 views for 1 case, 22 for 5, 5 for 20) and none for a short run
    from samunet.training.augmented_views import default_views
    rule = cfg["augmented_views"]
    assert [default_views(rule, n, 100 * 50 * 16)[0] for n in (34, 180, 720, 7000)] == [64, 22, 5, 0]
    assert default_views(rule, 128, 8 * 25 * 8)[0] == 0
    older = {k: v for k, v in rule.items() if k != "max_views"}  # plans made before the rule allowed 64 keep 16
    assert default_views(older, 34, 100 * 50 * 16)[0] == 16
    from samunet.planning.plans_checks import check_plans
    for key, bad in (("max_views", "lots"), ("encoder_s_per_input", 0), ("budget_s", -1.0)):  # a hand-edited rule
        edited = json.loads(json.dumps(plans))
        edited["configurations"]["2d"]["augmented_views"][key] = bad
        with pytest.raises(SamunetError,
                           match=f"plans.json: configurations.2d.augmented_views.{key} is {bad!r}, not a number"):
            check_plans(edited, "plans.json")
    monkeypatch.setattr(logging.getLogger("samunet"), "propagate", True)  # a CLI run in this process turns it off
    with caplog.at_level("WARNING", logger="samunet"):
        check_plans(plans, "plans.json")  # every key the planner writes is one samunet knows
        assert not caplog.records
        edited = json.loads(json.dumps(plans))
        edited["configurations"]["2d"]["batchsize"] = 8  # a misspelt key would change nothing: said so
        check_plans(edited, "plans.json")
        assert set(caplog.messages) == {"plans.json: configurations.2d.batchsize is not a key samunet reads; it "
                                        "changes nothing (did you mean batch_size?)"}
    edited["configurations"]["2d"]["hybrid"]["canvas_size"] = 48  # the hybrid head's stages would not line up
    with pytest.raises(SamunetError, match=r"plans.json: configurations.2d.hybrid.feature_map_sizes\[0\] is \[64, "
                                           r"64\], but a 48 px canvas through strides \[\[1, 1\]\] gives \[48, 48\]"):
        check_plans(edited, "plans.json")
    edited = json.loads(json.dumps(plans))
    edited["configurations"]["2d"]["unet"]["deep_supervision"] = True  # an option of either network block
    check_plans(edited, "plans.json")
    edited["configurations"]["2d"]["hybrid"]["deep_supervision"] = "yes"
    with pytest.raises(SamunetError, match="plans.json: configurations.2d.hybrid.deep_supervision is 'yes', not true "
                                           "or false"):
        check_plans(edited, "plans.json")
    assert plans["configurations"]["2.5d"]["channel_rule"]["type"] == "neighbour_slices"
    assert plans["configurations"]["2.5d"]["data_identifier"] == cfg["data_identifier"]
    emb = plans["configurations"]["2.5d_emb"]
    # the head fuses neighbouring slices' cached embeddings; the encoder inputs, and so the cache, are 2d's
    assert emb["embedding_context"] == 3 and emb["embedding_cache"] == "2d" and emb["slice_context"] == 1
    assert emb["data_identifier"] == cfg["data_identifier"] and cfg["embedding_context"] == 1
    assert cfg["hybrid"]["canvas_size"] == 64 and cfg["early_stopping_patience"] == 15
    # on a CPU a fold stays within a few hours: the epoch cap shrinks with each model's cost per sample
    cpu = cfg["cpu_num_epochs"]
    assert 5 <= cpu["autosam"] <= cpu["hybrid"] <= cpu["unet"] <= cfg["num_epochs"]
    from samunet.planning.planner import _cpu_epochs
    busy = _cpu_epochs({**cfg, "iterations_per_epoch": 250, "batch_size": 32})[0]  # where the cap binds
    assert 5 <= busy["autosam"] < busy["hybrid"] < busy["unet"] < cfg["num_epochs"], busy
    assert cfg["unet"]["canvas_size"] == 64 and "canvas_reason" in cfg["unet"]
    assert "hours" in cfg["cpu_num_epochs_reason"]
    for key in ("slice_axis_reason", "input_size_reason", "inplane_mode_reason", "head_reason",
                "batch_size_reason", "cache_reason", "spacing_reason", "early_stopping_reason",
                "embedding_context_reason"):
        assert cfg[key]
    data_dir = pp / cfg["data_identifier"]
    for c in cases:
        data = np.load(data_dir / f"{c}.npy")
        seg = np.load(data_dir / f"{c}_seg.npy")
        props = json.loads((data_dir / f"{c}.json").read_text())
        assert data.shape[1:] == seg.shape == tuple(props["shape_after_resampling"])
        assert data.dtype == np.float32 and 0.0 <= data.min() and data.max() <= 1.0
        assert set(np.unique(seg)) <= {0, 1, 2}
    assert len(list((pp / "gt_segmentations").iterdir())) == 20
    before = tree_snapshot(data_dir)
    r = subprocess.run(CLI + ["-d", "Dataset004_Hippocampus", "-np", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "already preprocessed" in r.stderr
    assert tree_snapshot(data_dir) == before, "finished cases were written again"


def test_plans_are_deterministic(samunet_dirs):
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], hippo_cases(6))
    extract_fingerprint(4, num_processes=2)
    first = plan(4)
    extract_fingerprint(4, num_processes=1, clean=True)
    assert plan(4) == first
    assert first["encoder"]["cpu_precision"] == "fp32"
    # the int8 CPU path is the user's choice, recorded with its reason; only lite_medsam has it
    int8 = plan(4, cpu_precision="int8")
    assert int8["encoder"]["cpu_precision"] == "int8"
    assert "--cpu_precision" in int8["encoder"]["cpu_precision_reason"]
    assert int8["configurations"] == first["configurations"]
    with pytest.raises(SamunetError, match="lite_medsam"):
        plan(4, encoder="test_tiny", cpu_precision="int8")
    # auto: int8 only where this machine's int8 kernel is exact (where it pays), saying which it found
    from samunet.models.int8_linear import kernel_is_exact
    auto = plan(4, cpu_precision="auto")["encoder"]
    assert auto["cpu_precision"] == ("int8" if kernel_is_exact() else "fp32")
    assert "--cpu_precision auto" in auto["cpu_precision_reason"] and "VNNI" in auto["cpu_precision_reason"]


def test_drive_planned_so_thin_vessels_survive(samunet_dirs):
    cases = ["DRIVE_21", "DRIVE_22", "DRIVE_23"]
    copy_dataset(DRIVE, samunet_dirs["samunet_raw"], cases)
    plans = plan_and_preprocess(201, verify=True, num_processes=2)
    cfg = plans["configurations"]["2d"]
    assert list(plans["configurations"]) == ["2d"]
    assert cfg["channel_rule"]["type"] == "rgb"
    assert cfg["target_spacing_inplane"] == [1.0, 1.0]          # native pixels
    assert cfg["inplane_mode"] == "sliding_window"               # a 584 px image is not squeezed into 256
    assert "vessel" in cfg["inplane_mode_reason"]
    assert cfg["normalization"][0]["scheme"] == "natural_8bit"
    data_dir = samunet_dirs["samunet_preprocessed"] / "Dataset201_DRIVE" / cfg["data_identifier"]
    for c in cases:
        seg = np.load(data_dir / f"{c}_seg.npy")
        orig, _ = read_seg(DRIVE / "labelsTr" / f"{c}.png")
        assert (seg == 1).sum() == (orig == 1).sum()            # every vessel pixel is still there


def test_em_is_resized_whole(samunet_dirs):
    copy_dataset(EM, samunet_dirs["samunet_raw"], ["EM_00", "EM_01", "EM_02"])
    plans = plan_and_preprocess(204, num_processes=1, no_pp=True)
    cfg = plans["configurations"]["2d"]
    assert cfg["channel_rule"]["type"] == "replicate"
    assert cfg["encoder_input_size"] == 256 and cfg["inplane_mode"] == "resize"
    assert not (samunet_dirs["samunet_preprocessed"] / "Dataset204_ISBI2012EM" / cfg["data_identifier"]).exists()


def _write_and_compare(seg, props, original_file, out_file):
    write_seg(seg, props, out_file)
    a, b = sitk.ReadImage(str(original_file)), sitk.ReadImage(str(out_file))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


def test_label_volume_inverts_to_original_geometry(samunet_dirs, tmp_path):
    cases = hippo_cases(6)
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], cases)
    plans = plan_and_preprocess(4, num_processes=1, no_pp=True)
    cfg = plans["configurations"]["2d"]
    assert cfg["transpose_forward"] != [0, 1, 2]  # the inversion has a transpose to undo
    for c in cases[:3]:
        label = HIPPO / "labelsTr" / f"{c}.nii.gz"
        _, seg, props = preprocess_case([HIPPO / "imagesTr" / f"{c}_0000.nii.gz"], label, cfg, plans["label_values"])
        back = revert_seg(seg, props, plans["label_values"])
        _write_and_compare(back, props["original"], label, tmp_path / f"{c}.nii.gz")


def test_png_label_inverts_exactly(samunet_dirs, tmp_path):
    copy_dataset(DRIVE, samunet_dirs["samunet_raw"], ["DRIVE_21", "DRIVE_22"])
    plans = plan_and_preprocess(201, num_processes=1, no_pp=True)
    cfg = plans["configurations"]["2d"]
    label = DRIVE / "labelsTr" / "DRIVE_22.png"
    _, seg, props = preprocess_case([DRIVE / "imagesTr" / "DRIVE_22_0000.png"], label, cfg, plans["label_values"])
    back = revert_seg(seg, props, plans["label_values"])
    _write_and_compare(back, props["original"], label, tmp_path / "DRIVE_22.png")


def test_resampled_case_inverts_closely(samunet_dirs):
    c = hippo_cases(1)[0]
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], [c])
    cfg = dict(plan_and_preprocess(4, num_processes=1, no_pp=True)["configurations"]["2d"])
    cfg["target_spacing_inplane"] = [0.6, 1.4]
    label = HIPPO / "labelsTr" / f"{c}.nii.gz"
    data, seg, props = preprocess_case([HIPPO / "imagesTr" / f"{c}_0000.nii.gz"], label, cfg, [0, 1, 2])
    assert data.shape[2:] != tuple(props["shape_after_cropping"][t] for t in cfg["transpose_forward"][1:])
    orig, _ = read_seg(label)
    back = revert_seg(seg, props, [0, 1, 2])
    for v in (1, 2):
        dice = 2 * ((back == v) & (orig == v)).sum() / ((back == v).sum() + (orig == v).sum())
        assert dice > 0.95, (v, dice)


def test_multichannel_data_keeps_every_channel(samunet_dirs):
    cases = hippo_cases(3)
    ds = copy_dataset(HIPPO, samunet_dirs["samunet_raw"], cases, name="Dataset104_TwoChannel")
    meta = json.loads((ds / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T2", "1": "ADC"}
    (ds / "dataset.json").write_text(json.dumps(meta))
    for c in cases:  # a second, different channel: the image flipped along one axis
        img = sitk.ReadImage(str(ds / "imagesTr" / f"{c}_0000.nii.gz"))
        flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(img)[:, ::-1].copy())
        flipped.CopyInformation(img)
        sitk.WriteImage(flipped, str(ds / "imagesTr" / f"{c}_0001.nii.gz"))
    plans = plan_and_preprocess(104, verify=True, num_processes=1)
    for cfg in plans["configurations"].values():
        assert cfg["channel_rule"]["type"] == "encode_each_and_fuse"
        assert len(cfg["normalization"]) == 2
    data = np.load(samunet_dirs["samunet_preprocessed"] / ds.name / "samunetPlans_2d" / f"{cases[0]}.npy")
    assert data.shape[0] == 2 and not np.array_equal(data[0], data[1])


def test_fingerprint_class_sizes_match_the_labels(samunet_dirs):
    cases = hippo_cases(5)
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], cases)
    fp = extract_fingerprint(4, num_processes=1)
    segs = [read_seg(HIPPO / "labelsTr" / f"{c}.nii.gz")[0] for c in cases]
    for v in (1, 2):
        assert fp["class_properties"][str(v)]["median_voxels_per_case"] == np.median([(s == v).sum() for s in segs])
        assert fp["class_properties"][str(v)]["median_objects_per_case"] >= 1
    assert fp["spacings"] == [[1.0, 1.0, 1.0]] * 5
    stats = fp["foreground_intensity_properties_per_channel"]["0"]
    assert stats["min"] <= stats["percentile_00_5"] <= stats["median"] <= stats["percentile_99_5"] <= stats["max"]


def test_killed_preprocessing_resumes_without_damage(samunet_dirs):
    cases = hippo_cases(60)
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], cases)
    plans = plan_and_preprocess(4, num_processes=1, no_pp=True)
    data_dir = samunet_dirs["samunet_preprocessed"] / "Dataset004_Hippocampus" / "samunetPlans_2d"
    cmd = [sys.executable, "-c", "from samunet.cli import preprocess_entry as m; m()", "-d", "4", "-np", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(data_dir.glob("*.json"))) < 5:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = list(data_dir.glob("*.json"))
    assert 5 <= len(finished) < 60, "the run was not interrupted part-way"
    for f in data_dir.glob("*.npy"):
        np.load(f)  # nothing under a final name is truncated
    done_before = {f.name: f.stat().st_mtime_ns for f in finished}
    preprocess(4, num_processes=2)
    assert not list(data_dir.glob(".*.tmp"))
    for name, mtime in done_before.items():
        assert (data_dir / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    cfg = plans["configurations"]["2d"]
    for c in cases[::7]:
        data, seg, _ = preprocess_case([HIPPO / "imagesTr" / f"{c}_0000.nii.gz"], HIPPO / "labelsTr" / f"{c}.nii.gz",
                                       cfg, plans["label_values"])
        assert np.array_equal(np.load(data_dir / f"{c}.npy"), data)
        assert np.array_equal(np.load(data_dir / f"{c}_seg.npy"), seg)


def test_convert_msd_splits_4d_images(samunet_dirs, tmp_path):
    task = tmp_path / "Task09_TwoChannel"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    cases = hippo_cases(2)
    for c in cases:
        img = sitk.ReadImage(str(HIPPO / "imagesTr" / f"{c}_0000.nii.gz"))
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        four = sitk.JoinSeries([sitk.GetImageFromArray(a), sitk.GetImageFromArray(a * 2)])
        four.SetSpacing(img.GetSpacing() + (1.0,))
        four.SetOrigin(img.GetOrigin() + (0.0,))
        d = np.eye(4)
        d[:3, :3] = np.array(img.GetDirection()).reshape(3, 3)
        four.SetDirection(d.ravel().tolist())
        sitk.WriteImage(four, str(task / "imagesTr" / f"{c}.nii.gz"))
        sitk.WriteImage(four, str(task / "imagesTs" / f"{c}.nii.gz"))
        sitk.WriteImage(sitk.ReadImage(str(HIPPO / "labelsTr" / f"{c}.nii.gz")), str(task / "labelsTr" / f"{c}.nii.gz"))
    (task / "dataset.json").write_text(json.dumps({
        "name": "TwoChannel", "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "numTraining": 2}))
    r = subprocess.run([sys.executable, "-c", "from samunet.cli import convert_msd_entry as m; m()", "-i", str(task)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = samunet_dirs["samunet_raw"] / "Dataset009_TwoChannel"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2", "1": "ADC"} and meta["labels"]["Posterior"] == 2
    assert meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 2
    ref = sitk.ReadImage(str(HIPPO / "imagesTr" / f"{cases[0]}_0000.nii.gz"))
    c0 = sitk.ReadImage(str(out / "imagesTr" / f"{cases[0]}_0000.nii.gz"))
    c1 = sitk.ReadImage(str(out / "imagesTr" / f"{cases[0]}_0001.nii.gz"))
    assert c0.GetSpacing() == ref.GetSpacing() and c0.GetOrigin() == ref.GetOrigin()
    assert c0.GetDirection() == ref.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(c1), 2 * sitk.GetArrayFromImage(ref).astype(np.float32))
    assert (out / "imagesTs" / f"{cases[0]}_0001.nii.gz").is_file()
    plan_and_preprocess(9, verify=True, num_processes=1, no_pp=True)  # the result is a valid data set


def test_all_three_real_datasets_end_to_end(samunet_dirs):
    for src in (HIPPO, DRIVE, EM):
        copy_dataset(src, samunet_dirs["samunet_raw"])
    r = subprocess.run(CLI + ["-d", "4", "201", "204", "--verify_dataset_integrity", "-np", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = {"Dataset004_Hippocampus": (260, "resize", 128), "Dataset201_DRIVE": (40, "sliding_window", 256),
                "Dataset204_ISBI2012EM": (30, "resize", 256)}
    for name, (n, mode, size) in expected.items():
        cfg = _plans(samunet_dirs, name)["configurations"]["2d"]
        assert (cfg["inplane_mode"], cfg["encoder_input_size"]) == (mode, size), name
        data_dir = samunet_dirs["samunet_preprocessed"] / name / cfg["data_identifier"]
        assert len(list(data_dir.glob("*.json"))) == n
