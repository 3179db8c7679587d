"""The 2D PNG path end to end on real DRIVE images: sliding-window training and prediction written as PNG with the
input's geometry."""
import json
import shutil

import numpy as np
import SimpleITK as sitk

from conftest import DRIVE, copy_dataset, run_entry


def test_drive_trains_and_predicts_png_in_original_geometry(samunet_dirs, tmp_path):
    cases = [f"DRIVE_{i}" for i in range(21, 26)]  # 5 folds of one validation image
    copy_dataset(DRIVE, samunet_dirs["samunet_raw"], cases)
    from samunet.plan_and_preprocess import plan_and_preprocess
    from samunet.training.trainer import run_training
    plans = plan_and_preprocess(201, num_processes=2)
    assert plans["configurations"]["2d"]["inplane_mode"] == "sliding_window"
    t = run_training(201, "2d", 0, head="cnn", epochs=2, iterations_per_epoch=15, num_labeled_cases=1,
                     batch_size=4)
    assert len(t.val_ids) == 1 and len(t.train_ids) == 1
    summary = json.loads((t.output / "validation" / "summary.json").read_text())
    # vessels found after 30 steps of 4 tiles of one image
    assert summary["foreground_mean"]["Dice"] > 0.3, summary["mean"]
    # augmented views of RGB tiles (the hybrid head's strong augmentation): one view of a case, every tile encoded
    from samunet.training.augmented_views import AugmentedViews
    views = AugmentedViews(t.cache, canvas=256, views=1)
    n_tiles = len(t.cache.load(t.train_ids[0])[0])
    assert views.build(t.train_ids[:1], t.encoder) == n_tiles == 16
    emb, tgt, img, _ = views.load(t.train_ids[0])
    assert emb.shape == (16, 256, 64, 64) and img.shape == (16, 3, 256, 256) and np.asarray(tgt).max() == 1
    inp = tmp_path / "in"
    inp.mkdir()
    case = t.val_ids[0]
    shutil.copy(DRIVE / "imagesTr" / f"{case}_0000.png", inp)
    out = tmp_path / "out"
    r = run_entry("predict_from_modelfolder_entry", "-i", inp, "-o", out, "-m", t.model_dir, "--disable_tta")
    assert r.returncode == 0, r.stderr
    src = sitk.ReadImage(str(DRIVE / "imagesTr" / f"{case}_0000.png"))
    pred = sitk.ReadImage(str(out / f"{case}.png"))
    assert pred.GetSize() == src.GetSize() and pred.GetNumberOfComponentsPerPixel() == 1
    assert pred.GetSpacing() == src.GetSpacing() and pred.GetOrigin() == src.GetOrigin()
    arr = sitk.GetArrayFromImage(pred)
    assert set(np.unique(arr)) <= {0, 1}
    val = sitk.GetArrayFromImage(sitk.ReadImage(str(t.output / "validation" / f"{case}.png")))
    assert (arr == val).mean() > 0.99  # prediction reproduces the final validation
