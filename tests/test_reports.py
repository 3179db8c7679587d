"""Overlays and the HTML report on the session's real Hippocampus validation folder; the page in headless Chromium."""
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from conftest import HIPPO
from samunet.reports.cli import plot_overlay_pngs_entry, report_entry


def test_overlays_of_a_validation_folder_and_of_the_raw_data_set(trained, tmp_path):
    from samunet.reports.overlays import class_colours, largest_foreground_slice
    t, _ = trained
    plot_overlay_pngs_entry(["-i", str(t.output), "-o", str(tmp_path / "val")])
    assert sorted(p.stem for p in (tmp_path / "val").glob("*.png")) == sorted(t.val_ids)
    case = t.val_ids[0]
    png = imread(tmp_path / "val" / f"{case}.png")[..., :3]
    w = (png.shape[1] - 4) // 2  # reference and prediction side by side, 4 white columns between them
    assert png.shape[0] >= 256 and png.shape[1] == 2 * w + 4 and np.all(png[:, w:w + 4] == 1)
    # the slice shown is the one where the reference has most foreground (Hippocampus: spacing 1 mm, axis 0)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPO / "labelsTr" / f"{case}.nii.gz")))
    s = largest_foreground_slice(ref, 0)
    assert np.count_nonzero(ref[s]) == max(np.count_nonzero(ref[i]) for i in range(ref.shape[0]))
    left, right = png[:, :w], png[:, w + 4:]
    colours = class_colours(3)
    for c in (0, 1):  # both classes outlined in their colour, in the reference panel
        assert (np.abs(left - colours[c]).max(-1) < 0.02).sum() > 20
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(t.output / "validation" / f"{case}.nii.gz")))
    if np.count_nonzero(pred[s] == 1):
        assert (np.abs(right - colours[0]).max(-1) < 0.02).sum() > 0
    plot_overlay_pngs_entry(["-d", "4", "-o", str(tmp_path / "raw"), "-np", "2"])
    assert len(list((tmp_path / "raw").glob("*.png"))) == 20


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                           text=True, timeout=900)
        exe = shutil.which("chromium")
        if exe is None:
            pytest.skip(f"Chromium is not installed and 'apt-get install chromium' failed: {r.stderr.strip()[-300:]}")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the browser check needs it")
    return exe


def test_report_of_a_fold_validation_opens_in_headless_chromium_with_its_images(trained, tmp_path):
    t, _ = trained
    report_entry([str(t.output), "-o", str(tmp_path / "report")])
    page = (tmp_path / "report" / "report.html").read_text()
    summary = json.loads((t.output / "validation" / "summary.json").read_text())
    dice = {os.path.basename(e["prediction_file"]): np.mean([m["Dice"] for m in e["metrics"].values()])
            for e in summary["metric_per_case"]}
    listed = re.findall(r">(hippocampus_\d+\.nii\.gz)</a>|<td>(hippocampus_\d+\.nii\.gz)</td>", page)
    listed = [a or b for a, b in listed]
    assert listed == sorted(dice, key=dice.get)  # every case, worst first
    plans = json.loads((t.model_dir / "plans.json").read_text())["configurations"]["2d"]
    for reason in ("input_size_reason", "inplane_mode_reason", "head_reason", "batch_size_reason"):
        assert html.escape(plans[reason]) in page, reason
    assert f"{summary['foreground_mean']['Dice']:.4f}" in page
    images = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert "report_files/progress.png" in images and len(images) == 1 + 4  # 2 worst + 2 best of 4 cases
    for src in images:
        assert (tmp_path / "report" / src).is_file(), src

    exe = _chromium()
    probe = tmp_path / "report" / "probe.html"  # the same page, plus a script that reports what the browser loaded
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => { document.body."
                                  "setAttribute('data-loaded', JSON.stringify([...document.images].map(i => "
                                  "[i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]))); });"
                                  "</script></body>"))
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=180)
    m = re.search(r'data-loaded="([^"]*)"', r.stdout)
    assert m, (r.stdout[-500:], r.stderr[-1000:])
    loaded = json.loads(m.group(1).replace("&quot;", '"'))
    assert [x[0] for x in loaded] == images
    for src, complete, width, height in loaded:
        assert complete and width > 0 and height > 0, src  # every image loaded and decoded
    assert "samunet report" in r.stdout and "Per case, worst first" in r.stdout


def test_report_and_overlays_of_an_evaluated_samunet_predict_folder(trained, hippo_cli_prediction, tmp_path):
    from samunet.evaluation.cli import evaluate_folder_entry
    t, _ = trained
    case, _, out, _ = hippo_cli_prediction
    pred = tmp_path / "pred"
    shutil.copytree(out, pred)  # the session's prediction stays as it is
    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(HIPPO / "labelsTr" / f"{case}.nii.gz", gt)
    evaluate_folder_entry([str(gt), str(pred), "-djfile", str(HIPPO / "dataset.json")])
    report_entry([str(pred)])
    page = (pred / "report.html").read_text()
    assert f">{case}.nii.gz</a>" in page and "samunetTrainer_hybrid_n4__samunetPlans__2d folds 0" in page
    assert (pred / "report_files" / f"{case}.png").is_file() and (pred / "report_files" / "progress.png").is_file()
    assert html.escape(json.loads((t.model_dir / "plans.json").read_text())["configurations"]["2d"]["head_reason"]) \
        in page
    plot_overlay_pngs_entry(["-i", str(pred), "-o", str(tmp_path / "png"), "--reference", str(gt)])
    png = imread(tmp_path / "png" / f"{case}.png")
    assert png.shape[1] > png.shape[0]  # reference and prediction panels
