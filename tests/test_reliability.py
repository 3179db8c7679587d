"""Fault injection on copies of the real data sets (issue 16): every bad input is refused with
``error: <file>: <problem>`` and exit code 1, without a traceback, and nothing is written where nothing should be."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import HIPPO, assert_refused, copy_dataset, hippo_cases, hippo_slab, run_entry, use_folders
from samunet.utils import SamunetError

NAME = "Dataset004_Hippocampus"


def _cli(entry: str, *args, env=None):
    module = "samunet.evaluation.cli" if entry.startswith("evaluate") else "samunet.cli"
    return run_entry(entry, *args, env=env, module=module)


def _nothing_in(folder: Path):
    assert not folder.exists() or not any(folder.iterdir()), sorted(p.name for p in folder.rglob("*"))


def _write_like(arr: np.ndarray, ref: sitk.Image, path: Path, spacing=None):
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    if spacing is not None:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), True)


@pytest.fixture
def hippo3(samunet_dirs):
    return copy_dataset(HIPPO, samunet_dirs["samunet_raw"], hippo_cases(3))


def _plan(*extra):
    return _cli("plan_and_preprocess_entry", "-d", "4", "-np", "1", "-c", "2d", *extra)


# ---------------------------------------------------------------- 1. truncated files
@pytest.mark.parametrize("verify", [False, True])
def test_1_truncated_image_or_label_is_refused(hippo3, samunet_dirs, verify):
    a, b = hippo_cases(3)[:2]
    for f in (hippo3 / "imagesTr" / f"{a}_0000.nii.gz", hippo3 / "labelsTr" / f"{b}.nii.gz"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    r = _plan(*(["--verify_dataset_integrity"] if verify else []))
    assert_refused(r, f"{a}_0000.nii.gz: cannot be read: truncated file",
                   f"labelsTr/{b}.nii.gz: cannot be read: truncated")
    _nothing_in(samunet_dirs["samunet_preprocessed"])


# ---------------------------------------------------------------- 2. constant image, non-empty label
def test_2_all_zero_image_with_a_label_is_refused(hippo3, samunet_dirs):
    case = hippo_cases(3)[1]
    f = hippo3 / "imagesTr" / f"{case}_0000.nii.gz"
    ref = sitk.ReadImage(str(f))
    _write_like(np.zeros_like(sitk.GetArrayFromImage(ref)), ref, f)
    assert_refused(_plan(), f"{case}_0000.nii.gz: image is constant (every voxel 0) but its label {case}.nii.gz has")
    _nothing_in(samunet_dirs["samunet_preprocessed"])


# ---------------------------------------------------------------- 3. a 2D case in a 3D data set
@pytest.mark.parametrize("verify", [False, True])
def test_3_two_d_case_in_a_three_d_data_set_is_refused(hippo3, samunet_dirs, verify):
    case = hippo_cases(3)[2]
    for f in (hippo3 / "imagesTr" / f"{case}_0000.nii.gz", hippo3 / "labelsTr" / f"{case}.nii.gz"):
        img = sitk.ReadImage(str(f))
        sitk.WriteImage(img[:, :, img.GetSize()[2] // 2], str(f), True)
    r = _plan(*(["--verify_dataset_integrity"] if verify else []))
    assert_refused(r, f"{case}_0000.nii.gz: 2D image, but 2 of the data set's 3 cases are 3D")
    _nothing_in(samunet_dirs["samunet_preprocessed"])


# ---------------------------------------------------------------- 4. absurd spacing, memory budget
def test_4_absurd_spacing_is_refused_before_any_work(hippo3, samunet_dirs):
    case = hippo_cases(3)[0]
    for f in (hippo3 / "imagesTr" / f"{case}_0000.nii.gz", hippo3 / "labelsTr" / f"{case}.nii.gz"):
        img = sitk.ReadImage(str(f))
        img.SetSpacing((1.0, 1.0, 1000.0))
        sitk.WriteImage(img, str(f), True)
    assert_refused(_plan(),
                   f"{case}_0000.nii.gz: spacing (1000.0, 1.0, 1.0) mm is 1000 times the data set's median 1 mm")
    _nothing_in(samunet_dirs["samunet_preprocessed"])


def test_4_resampled_size_beyond_the_memory_budget_is_refused_before_preprocessing(hippo3, samunet_dirs):
    r = _plan("--memory_gb", "0.0001")
    assert_refused(r, "_0000.nii.gz: resampled to", "more than the memory budget of 0.0001 GB")
    pp = samunet_dirs["samunet_preprocessed"] / NAME
    assert not (pp / "samunetPlans_2d").exists() and not (pp / "gt_segmentations").exists()


# ---------------------------------------------------------------- 6. path traversal
def test_6_data_set_names_cannot_leave_the_samunet_folders(samunet_dirs, tmp_path):
    outside = tmp_path / "outside"
    copy_dataset(HIPPO, outside, hippo_cases(3))
    bad = f"{NAME}/../../outside/{NAME}"
    r = _cli("plan_and_preprocess_entry", "-d", bad, "-np", "1")
    assert_refused(r, f"'{bad}': not a plain data set name DatasetXXX_Name")
    assert sorted(p.name for p in outside.iterdir()) == [NAME]
    assert sorted(p.name for p in (outside / NAME).iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    _nothing_in(samunet_dirs["samunet_preprocessed"])
    r = _cli("train_entry", "Dataset004_../x", "2d", "0")
    assert_refused(r, "'Dataset004_../x': not a plain data set name")
    _nothing_in(samunet_dirs["samunet_results"])


# ---------------------------------------------------------------- 7. per-case invariants without the integrity check
def test_7_undeclared_label_and_shape_mismatch_are_named_without_verify(hippo3, samunet_dirs):
    a, b, c = hippo_cases(3)
    f = hippo3 / "labelsTr" / f"{a}.nii.gz"
    ref = sitk.ReadImage(str(f))
    arr = sitk.GetArrayFromImage(ref)
    arr[0, 0, 0] = 3
    _write_like(arr, ref, f)
    f = hippo3 / "labelsTr" / f"{b}.nii.gz"
    img = sitk.ReadImage(str(f))
    sitk.WriteImage(img[:, :, 1:], str(f), True)
    f = hippo3 / "labelsTr" / f"{c}.nii.gz"
    img = sitk.ReadImage(str(f))
    img.SetSpacing((1.0, 1.5, 1.0))
    sitk.WriteImage(img, str(f), True)
    err = assert_refused(_plan(), f"{a}.nii.gz: label value(s) [3] not declared in dataset.json (declared: [0, 1, 2])",
                         f"{b}.nii.gz: geometry differs from image {b}_0000.nii.gz (shape",
                         f"{c}.nii.gz: geometry differs from image {c}_0000.nii.gz "
                         "(spacing (1.0, 1.0, 1.0) vs (1.0, 1.5, 1.0))")
    assert "3 problem(s)" in err
    _nothing_in(samunet_dirs["samunet_preprocessed"])


def test_also_a_folder_named_like_a_case_file_is_called_a_folder(hippo3, samunet_dirs):
    case = hippo_cases(3)[0]
    f = hippo3 / "imagesTr" / f"{case}_0000.nii.gz"
    f.unlink()
    f.mkdir()
    assert_refused(_plan("--verify_dataset_integrity"), f"{case}_0000.nii.gz: is a folder, not an image file")
    _nothing_in(samunet_dirs["samunet_preprocessed"])


# ---------------------------------------------------------------- 9. ensemble with bad .npz
def test_9_ensemble_names_an_object_array_or_truncated_npz(tmp_path):
    case = hippo_cases(1)[0]
    folders = []
    for name in ("a", "b"):
        f = tmp_path / name
        f.mkdir()
        shutil.copy(HIPPO / "dataset.json", f)
        shutil.copy(HIPPO / "labelsTr" / f"{case}.nii.gz", f)
        np.savez_compressed(f / f"{case}.npz", probabilities=np.full((3, 4, 4, 4), 1 / 3, np.float16))
        folders.append(f)
    good = (folders[1] / f"{case}.npz").read_bytes()
    np.savez(folders[0] / f"{case}.npz", probabilities=np.array([{"x": 1}, None], dtype=object))
    out = tmp_path / "out"
    assert_refused(_cli("ensemble_entry", "-i", *folders, "-o", out),
                   f"a/{case}.npz: 'probabilities' must be a float array", "never loads object arrays")
    assert not out.exists()
    np.savez_compressed(folders[0] / f"{case}.npz", probabilities=np.full((3, 4, 4, 4), 1 / 3, np.float16))
    (folders[1] / f"{case}.npz").write_bytes(good[: len(good) // 2])
    assert_refused(_cli("ensemble_entry", "-i", *folders, "-o", out),
                   f"b/{case}.npz: not a readable probabilities file (truncated or corrupt .npz")
    assert not out.exists()


# ---------------------------------------------------------------- 10. folders that cannot be written
def test_10_samunet_preprocessed_or_output_that_is_a_file(hippo3, samunet_dirs, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("samunet_preprocessed", str(blocker))
    assert_refused(_plan(), f"{blocker}/{NAME}: samunet_preprocessed must be a folder, but it is or lies under "
                   f"a regular file ({blocker} is a file)")
    assert blocker.read_text() == "not a folder"
    monkeypatch.setenv("samunet_preprocessed", str(blocker / "sub"))
    assert_refused(_plan(), "samunet_preprocessed must be a folder")
    inp = tmp_path / "in"
    inp.mkdir()
    assert_refused(_cli("predict_from_modelfolder_entry", "-i", inp, "-o", blocker, "-m", tmp_path / "no_model"),
                   f"{blocker}: the output folder (-o) must be a folder")
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------- 11. concurrent runs
def test_11_temporary_files_of_a_running_writer_survive_a_sweep(tmp_path):
    from samunet.utils import atomic_write_bytes, sweep_stale_temps, temp_path
    alive = temp_path(tmp_path / "x_emb.npy")
    alive.write_bytes(b"being written")
    assert alive != temp_path(tmp_path / "x_emb.npy")  # every writer gets its own name
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".x_emb.npy.{dead.pid}-abcd@{socket.gethostname()}.tmp"
    stale.write_bytes(b"left by a killed run")
    assert sweep_stale_temps(tmp_path) == 1
    assert alive.is_file() and not stale.exists()
    atomic_write_bytes(tmp_path / "y.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "y.json"]


# ---------------------------------------------------------------- the trained model (5., 8., 11. and prediction)
@pytest.fixture(scope="module")
def model(hippo20, tmp_path_factory):
    """The session's 20 planned cases and their cached embeddings; the linear and cnn heads trained on 3 labelled
    cases of fold 0 for 1 epoch x 2 iterations, in a results folder of their own."""
    from samunet.training.trainer import run_training
    results = tmp_path_factory.mktemp("reliability_results")
    with use_folders(hippo20, results):
        for head in ("linear", "cnn"):
            run_training(4, "2d", 0, head=head, epochs=1, iterations_per_epoch=2, num_labeled_cases=3, batch_size=2,
                         device="cpu")
        yield results / NAME


def _train(*args, env=None):
    """samunet_train of the fixture's runs (fold 0, 3 labelled cases) on the CPU."""
    return _cli("train_entry", "4", "2d", "0", "--num_labeled_cases", "3", *args, "--device", "cpu", env=env)


def _predict(inp, out, *extra):
    return _cli("predict_entry", "-i", inp, "-o", out, "-d", "4", "-c", "2d", "-f", "0", "--num_labeled_cases", "3",
                "--disable_tta", "--device", "cpu", *(extra or ("--head", "linear")))


def test_1_3_4_prediction_refuses_truncated_2d_and_absurd_spacing_files(model, tmp_path):
    good, other = hippo_cases(2)
    inp = tmp_path / "in"
    inp.mkdir()
    src = HIPPO / "imagesTr" / f"{other}_0000.nii.gz"
    hippo_slab(good, inp / f"{good}_0000.nii.gz")
    data = src.read_bytes()
    (inp / "truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    img = sitk.ReadImage(str(src))
    sitk.WriteImage(img[:, :, 10], str(inp / "flat_0000.nii.gz"), True)
    img.SetSpacing((1000.0, 1000.0, 1000.0))
    sitk.WriteImage(img, str(inp / "huge_0000.nii.gz"), True)
    out = tmp_path / "out"
    assert_refused(_predict(inp, out), "3 case(s) could not be predicted (the other 1 were written",
                   "truncated_0000.nii.gz: cannot be read: truncated file",
                   "flat_0000.nii.gz: 2D image, but the data set is 3D",
                   "huge_0000.nii.gz: in-plane spacing (1000.0, 1000.0) mm is 1000 times the plans' target spacing")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{good}.nii.gz"]
    assert not list(out.glob(".*"))


def test_5_and_8_prediction_checks_each_checkpoint_like_training_does(model, tmp_path):
    cnn = model / "samunetTrainer_cnn_n3__samunetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    linear = model / "samunetTrainer_linear_n3__samunetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(HIPPO / "imagesTr" / f"{hippo_cases(1)[0]}_0000.nii.gz", inp)
    backup = tmp_path / "backup.pth"
    shutil.copyfile(cnn, backup)
    try:
        shutil.copyfile(linear, cnn)
        assert_refused(_predict(inp, tmp_path / "o1", "--head", "cnn"),
                       f"{cnn}: checkpoint does not belong to this run", "head is 'linear', expected 'cnn'",
                       "trainer is 'samunetTrainer_linear_n3', expected 'samunetTrainer_cnn_n3'")
        assert not (tmp_path / "o1").exists()
        cnn.write_bytes(b"")
        assert_refused(_predict(inp, tmp_path / "o2", "--head", "cnn"),
                       f"{cnn}: not a readable samunet checkpoint (empty file, 0 bytes")
        assert not (tmp_path / "o2").exists()
        r = _train("--head", "cnn", "--c")
        assert_refused(r, f"{cnn}: not a readable samunet checkpoint (empty file, 0 bytes")
    finally:
        shutil.copyfile(backup, cnn)


def test_also_an_unsafe_checkpoint_is_not_a_samunet_checkpoint(tmp_path):
    import torch
    from samunet.models.run_checkpoint import load_checkpoint
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"format": "samunet-checkpoint-1", "obj": Path("x")}, path)
    with pytest.raises(SamunetError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert f"{path}: not a samunet checkpoint" in msg and "never loads" in msg
    assert "weights_only" not in msg


def test_10_samunet_results_that_is_a_file_stops_training_with_a_named_error(model, tmp_path):
    blocker = tmp_path / "results_file"
    blocker.write_text("x")
    env = dict(os.environ, samunet_results=str(blocker))
    r = _train("--head", "autosam", env=env)
    assert_refused(r,
                   f"{blocker}/{NAME}/samunetTrainer_autosam_n3__samunetPlans__2d/fold_0: cannot create the run folder")
    assert blocker.read_text() == "x"


def test_11_a_second_run_of_the_same_fold_is_refused_and_a_dead_run_does_not_block(model):
    from samunet.training.run_lock import RunLock
    fold = model / "samunetTrainer_linear_n3__samunetPlans__2d" / "fold_0"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from samunet.training.run_lock import "
                               f"RunLock; l = RunLock({str(fold)!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in fold.rglob("*"))
        r = _train("--head", "linear", "--c")
        assert_refused(r, f"{fold}: another training run of this fold is running: pid {holder.pid} on host "
                          f"{socket.gethostname()}, started {time.strftime('%Y-%m-%d')}")
        assert sorted(p.name for p in fold.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    with RunLock(fold):  # the killed holder's lock is gone with its process
        pass
    assert not (fold / ".run.lock").exists()


def test_also_messages_print_plain_numbers(tmp_path):
    from samunet.evaluation.evaluate import evaluate_case
    case = hippo_cases(1)[0]
    ref = HIPPO / "labelsTr" / f"{case}.nii.gz"
    img = sitk.ReadImage(str(ref))
    img.SetSpacing((1.0, 1.0, 2.0))
    pred = tmp_path / f"{case}.nii.gz"
    sitk.WriteImage(img, str(pred), True)
    with pytest.raises(SamunetError) as e:
        evaluate_case(ref, pred, [1, 2])
    assert "spacing (2.0, 1.0, 1.0) does not match" in str(e.value) and "np.float64" not in str(e.value)


def test_also_a_hand_edited_plans_value_is_named_by_training_and_prediction(model, tmp_path):
    import json
    plans = Path(os.environ["samunet_preprocessed"]) / NAME / "samunetPlans.json"
    fold = model / "samunetTrainer_linear_n3__samunetPlans__2d" / "fold_0"
    before = sorted(p.name for p in fold.rglob("*"))
    saved = plans.read_bytes()
    try:
        for key, bad, expect in (
                ("batch_size", "abc", "configurations.2d.batch_size is 'abc', not an integer >= 1"),
                ("encoder_input_size", 100, "configurations.2d.encoder_input_size is 100, not valid for encoder "
                                            "lite_medsam (a multiple of 64, at least 64)"),
                ("normalization", [{"channel": 0, "scheme": "zscore"}],
                 "configurations.2d.normalization[0] is {'channel': 0, 'scheme': 'zscore'}, not an object whose "
                 "scheme is one of ct_window, percentile_clip, natural_8bit")):
            edited = json.loads(saved)
            edited["configurations"]["2d"][key] = bad
            plans.write_text(json.dumps(edited))
            assert_refused(_train("--head", "linear", "--c"), f"{plans}: {expect}")
    finally:
        plans.write_bytes(saved)
    assert sorted(p.name for p in fold.rglob("*")) == before
    copy = fold.parent / "plans.json"  # the model folder's own copy, which prediction reads
    saved = copy.read_bytes()
    try:
        edited = json.loads(saved)
        forward = edited["configurations"]["2d"]["transpose_forward"]
        edited["configurations"]["2d"]["transpose_backward"] = forward[::-1]
        copy.write_text(json.dumps(edited))
        inp = tmp_path / "in"
        inp.mkdir()
        shutil.copy(HIPPO / "imagesTr" / f"{hippo_cases(1)[0]}_0000.nii.gz", inp)
        assert_refused(_predict(inp, tmp_path / "out"),
                       f"{copy}: configurations.2d.transpose_backward {forward[::-1]} does not undo transpose_forward")
        assert not (tmp_path / "out").exists()
    finally:
        copy.write_bytes(saved)
