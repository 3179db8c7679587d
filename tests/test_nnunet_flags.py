"""nnU-Net's commands and flags on the session's real Hippocampus model and data: cross-validation accumulation,
plans moved to another data set (preprocessing identical), -tr / -step_size refusals."""
import json

import numpy as np
import pytest

from conftest import HIPPO, copy_dataset, hippo_cases, refused
from samunet.cli import predict_entry, preprocess_entry, train_entry
from samunet.crossval_and_plans_cli import accumulate_crossval_results_entry, move_plans_between_datasets_entry


def test_accumulate_crossval_results_matches_the_fold_validation(trained):
    t, _ = trained
    accumulate_crossval_results_entry(["-d", "4", "-c", "2d", "-tr", "samunetTrainer_hybrid_n4", "-f", "0"])
    out = t.model_dir / "crossval_results_folds_0"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in t.val_ids)
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((t.output / "validation" / "summary.json").read_text())
    for c in ("1", "2"):
        assert got["mean"][c]["Dice"] == pytest.approx(want["mean"][c]["Dice"], abs=1e-12)


def test_moved_plans_preprocess_another_data_set_exactly_like_the_source(trained, hippo_env):
    raw, pp = hippo_env / "samunet_raw", hippo_env / "samunet_preprocessed"
    target = "Dataset104_HippoSubset"
    cases = hippo_cases(2)
    copy_dataset(HIPPO, raw, cases, name=target)
    meta = json.loads((raw / target / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "front": 1, "back": 2}
    (raw / target / "dataset.json").write_text(json.dumps(meta))
    move_plans_between_datasets_entry(["-s", "4", "-t", "104", "-tp", "hippoPlans"])
    moved = json.loads((pp / target / "hippoPlans.json").read_text())
    source = json.loads((pp / "Dataset004_Hippocampus" / "samunetPlans.json").read_text())
    assert moved["dataset_name"] == target and moved["class_names"] == ["background", "front", "back"]
    assert moved["configurations"]["2d"]["data_identifier"] == "hippoPlans_2d"
    for key in ("preprocessing_identity", "encoder_input_size", "target_spacing_inplane", "normalization", "head"):
        assert moved["configurations"]["2d"][key] == source["configurations"]["2d"][key], key
    refused(move_plans_between_datasets_entry, "-s", "4", "-t", "104", "-tp", "hippoPlans",
            expect="hippoPlans.json: exists; pass --overwrite")
    from samunet.plan_and_preprocess import extract_fingerprint
    extract_fingerprint(target, num_processes=1)
    preprocess_entry(["-d", "104", "-c", "2d", "-plans_name", "hippoPlans", "-np", "1"])
    for c in cases:  # the same case preprocessed with the moved plans and with the source's own
        a = np.load(pp / target / "hippoPlans_2d" / f"{c}.npy")
        b = np.load(pp / "Dataset004_Hippocampus" / "samunetPlans_2d" / f"{c}.npy")
        assert np.array_equal(a, b)
    meta["channel_names"] = {"0": "MRI", "1": "T2"}
    (raw / target / "dataset.json").write_text(json.dumps(meta))
    refused(move_plans_between_datasets_entry, "-s", "4", "-t", "104", "-tp", "other",
            expect="2 channel(s), but the plans of Dataset004_Hippocampus are for 1")


def test_trainer_names_and_step_size_are_checked_before_any_work(trained, tmp_path):
    refused(train_entry, "4", "2d", "0", "-tr", "nnUNetTrainer", "-device", "cpu",
            expect="-tr nnUNetTrainer: not a samunet trainer name")
    refused(train_entry, "4", "2d", "0", "-tr", "samunetTrainer_cnn", "--head", "autosam",
            expect="name different heads")
    (tmp_path / "in").mkdir()
    refused(predict_entry, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "-d", "4", "-c", "2d",
            "-tr", "samunetTrainer_hybrid_n4", "-step_size", "1.5",
            expect="step size 1.5: must lie in (0, 1]")
    assert not (tmp_path / "o").exists()


def test_predict_without_head_takes_the_plans_head_or_the_only_trained_one(trained, tmp_path):
    import shutil
    from samunet.paths import results_folder
    (tmp_path / "in").mkdir()
    folders = [results_folder() / "Dataset004_Hippocampus" / f"samunetTrainer_{h}_n9__samunetPlans__2d"
               for h in ("autosam", "cnn")]
    argv = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "-d", "4", "-c", "2d", "--num_labeled_cases", "9"]
    try:
        for f in folders:
            f.mkdir()
        refused(predict_entry, *argv, expect="the plans' hybrid head has no trained model samunetTrainer_hybrid_n9 "
                "for Dataset004_Hippocampus configuration 2d; trained heads: autosam, cnn; choose one with --head")
        folders[1].rmdir()
        refused(predict_entry, *argv, expect="samunetTrainer_autosam_n9__samunetPlans__2d")  # the only one, used
        # samunet_accumulate_crossval_results follows the same rule (its models have no _n suffix)
        plain = results_folder() / "Dataset004_Hippocampus" / "samunetTrainer_cnn__samunetPlans__2d"
        folders.append(plain)
        plain.mkdir()
        refused(accumulate_crossval_results_entry, "-d", "4", "-c", "2d", "-f", "0",
                expect="samunetTrainer_cnn__samunetPlans__2d: no final validation for fold(s) 0")
    finally:
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)
