import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DRIVE, EM, HIPPO, copy_dataset, hippo_cases, require
from samunet.dataset.io import geometry_mismatch, read_images, read_seg, write_seg
from samunet.paths import resolve_dataset_name
from samunet.utils import SamunetError


def test_nifti_label_round_trip_keeps_geometry(tmp_path):
    src = require(HIPPO) / "labelsTr" / "hippocampus_001.nii.gz"
    seg, props = read_seg(src)
    write_seg(seg, props, tmp_path / "out.nii.gz")
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_rgb_png_is_three_channels_and_labels_round_trip(tmp_path):
    img = require(DRIVE) / "imagesTr" / "DRIVE_21_0000.png"
    data, props = read_images([img])
    assert data.shape == (3, 1, 584, 565)
    assert props["io"] == "natural2d" and props["dims"] == 2
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(img)))
    assert np.array_equal(data[1, 0], raw[..., 1])  # green channel in channel 1
    seg, sprops = read_seg(DRIVE / "labelsTr" / "DRIVE_21.png")
    assert geometry_mismatch(props, sprops) is None
    write_seg(seg, sprops, tmp_path / "x.png")
    assert np.array_equal(read_seg(tmp_path / "x.png")[0], seg)


def test_grey_png_is_one_channel():
    data, props = read_images([require(EM) / "imagesTr" / "EM_00_0000.png"])
    assert data.shape == (1, 1, 512, 512)


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(SamunetError, match="broken_0000.nii.gz: cannot be read"):
        read_images([bad])


def test_dataset_resolved_by_id_or_name(samunet_dirs):
    copy_dataset(HIPPO, samunet_dirs["samunet_raw"], hippo_cases(2))
    assert resolve_dataset_name(4) == "Dataset004_Hippocampus"
    assert resolve_dataset_name("004") == "Dataset004_Hippocampus"
    assert resolve_dataset_name("Dataset004_Hippocampus") == "Dataset004_Hippocampus"
    with pytest.raises(SamunetError, match="no data set with id 7"):
        resolve_dataset_name(7)


def test_unset_folder_uses_documented_default(monkeypatch, tmp_path, caplog):
    import samunet.paths as paths
    monkeypatch.delenv("samunet_results", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_announced", set())
    with caplog.at_level("WARNING", logger="samunet"):
        assert paths.results_folder() == tmp_path / "samunet_results"
        paths.results_folder()
    assert sum("samunet_results is not set" in r.message for r in caplog.records) == 1


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Checkpoints, plans and reports are readable by others as files from open() would be, not 0600 temp files."""
    import os
    from samunet.utils import atomic_write_bytes
    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
