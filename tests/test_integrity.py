"""Broken data sets: the error names the file and the problem, every problem is listed, nothing is written."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import HIPPO, copy_dataset, hippo_cases
from samunet.plan_and_preprocess import plan_and_preprocess
from samunet.utils import SamunetError

NAME = "Dataset004_Hippocampus"


@pytest.fixture
def hippo(samunet_dirs):
    return copy_dataset(HIPPO, samunet_dirs["samunet_raw"], hippo_cases(4))


def _run_expect_error(samunet_dirs, *patterns):
    with pytest.raises(SamunetError) as exc:
        plan_and_preprocess(4, verify=True, num_processes=1)
    msg = str(exc.value)
    for p in patterns:
        assert p in msg, msg
    assert not any(samunet_dirs["samunet_preprocessed"].iterdir()), "something was written despite the failure"
    return msg


def _edit_json(ds, **changes):
    meta = json.loads((ds / "dataset.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (ds / "dataset.json").write_text(json.dumps(meta))


def test_missing_channel_file(hippo, samunet_dirs):
    _edit_json(hippo, channel_names={"0": "T2", "1": "ADC"})
    cases = hippo_cases(4)
    for c in cases[1:]:  # every case but the first gets its second channel
        shutil.copy(hippo / "imagesTr" / f"{c}_0000.nii.gz", hippo / "imagesTr" / f"{c}_0001.nii.gz")
    _run_expect_error(samunet_dirs, f"case {cases[0]}", f"missing {cases[0]}_0001.nii.gz", "declares 2")


def test_mismatched_geometry(hippo, samunet_dirs):
    case = hippo_cases(4)[1]
    f = hippo / "labelsTr" / f"{case}.nii.gz"
    img = sitk.ReadImage(str(f))
    img.SetSpacing((1.0, 1.5, 1.0))
    sitk.WriteImage(img, str(f))
    _run_expect_error(samunet_dirs, f"{case}.nii.gz", "geometry differs", "spacing")


def test_undeclared_label_value(hippo, samunet_dirs):
    case = hippo_cases(4)[2]
    f = hippo / "labelsTr" / f"{case}.nii.gz"
    img = sitk.ReadImage(str(f))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 3
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(f))
    _run_expect_error(samunet_dirs, f"{case}.nii.gz", "label value(s) [3] not declared")


def test_nan_in_image(samunet_dirs):
    # SimpleITK reads NaN in NIfTI as 0, so this data set is stored as NRRD, where NaN survives
    ds = samunet_dirs["samunet_raw"] / NAME
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    cases = hippo_cases(3)
    for c in cases:
        img = sitk.Cast(sitk.ReadImage(str(HIPPO / "imagesTr" / f"{c}_0000.nii.gz")), sitk.sitkFloat32)
        if c == cases[1]:
            arr = sitk.GetArrayFromImage(img)
            arr[5, 5, 5] = np.nan
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            img = out
        sitk.WriteImage(img, str(ds / "imagesTr" / f"{c}_0000.nrrd"))
        sitk.WriteImage(sitk.ReadImage(str(HIPPO / "labelsTr" / f"{c}.nii.gz")), str(ds / "labelsTr" / f"{c}.nrrd"))
    meta = json.loads((HIPPO / "dataset.json").read_text())
    meta.update(numTraining=3, file_ending=".nrrd")
    (ds / "dataset.json").write_text(json.dumps(meta))
    _run_expect_error(samunet_dirs, f"{cases[1]}_0000.nrrd", "1 NaN/Inf voxel(s)")


def test_corrupt_file(hippo, samunet_dirs):
    case = hippo_cases(4)[3]
    f = hippo / "imagesTr" / f"{case}_0000.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    _run_expect_error(samunet_dirs, f"{case}_0000.nii.gz", "cannot be read")


def test_missing_dataset_json_key(hippo, samunet_dirs):
    _edit_json(hippo, file_ending=None)
    _run_expect_error(samunet_dirs, "dataset.json", "missing required key 'file_ending'")


def test_regions_and_ignore_are_refused_up_front(hippo, samunet_dirs):
    _edit_json(hippo, labels={"background": 0, "whole": [1, 2], "ignore": 3})
    _run_expect_error(samunet_dirs, "region-based training is not supported", "'ignore' label is not supported")


def test_numtraining_and_all_problems_at_once(hippo, samunet_dirs):
    _edit_json(hippo, numTraining=5)
    cases = hippo_cases(4)
    (hippo / "labelsTr" / f"{cases[0]}.nii.gz").unlink()
    (hippo / "imagesTr" / "stray.txt").write_text("x")
    msg = _run_expect_error(samunet_dirs, "numTraining is 5 but imagesTr holds 4", f"{cases[0]}.nii.gz not found",
                            "stray.txt: does not match CASE_XXXX.nii.gz")
    assert "3 problem(s)" in msg


def test_cli_reports_error_without_traceback(hippo, samunet_dirs):
    _edit_json(hippo, file_ending=None)
    r = subprocess.run([sys.executable, "-c", "from samunet.cli import plan_and_preprocess_entry as m; m()",
                        "-d", "4", "--verify_dataset_integrity", "-np", "1"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "error:" in r.stderr and "missing required key 'file_ending'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not any(samunet_dirs["samunet_preprocessed"].iterdir())
