"""On the session's trained Hippocampus model and the middle slices of a real case: the Python predictor gives
samunet_predict's labels voxel for voxel from an in-memory array; an exported model installs into an empty
samunet_results and predicts identically; unsafe zips and foreign encoders are refused with nothing written."""
import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import predict_slab, refused
from samunet.utils import SamunetError
from samunet.sharing.cli import export_model_to_zip_entry, install_pretrained_model_from_zip_entry

NAME = "Dataset004_Hippocampus"
MODEL = "samunetTrainer_hybrid_n4__samunetPlans__2d"


def _rezip(src, dst, manifest_edit=None, extra=None):
    """A copy of the zip ``src`` with its manifest edited and extra entries (name -> bytes) added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "samunet_model.json" and manifest_edit:
                m = json.loads(data)
                manifest_edit(m)
                data = json.dumps(m).encode()
            zout.writestr(info, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def _predict_slab(t, tmp_path, name: str):
    """samunet_predict (default options) of the middle slices of the model's first validation case: (case, input
    image, output folder)."""
    case = t.val_ids[0]
    out = predict_slab(case, tmp_path / name, "-d", "4", "-c", "2d", "-tr", "samunetTrainer_hybrid_n4", "-f", "0",
                       "-device", "cpu", "--disable_progress_bar")
    return case, tmp_path / f"{name}_in" / f"{case}_0000.nii.gz", out


def test_predict_single_npy_array_equals_samunet_predict(trained, tmp_path):
    from samunet.inference.samunet_predictor import SamunetPredictor
    t, _ = trained
    case, slab, out = _predict_slab(t, tmp_path, "cli")
    img = sitk.ReadImage(str(slab))  # as a viewer holds it: an array
    image = sitk.GetArrayFromImage(img)[None].astype(np.float32)        # (C, Z, Y, X) and its spacing
    predictor = SamunetPredictor(device="cpu").initialize_from_trained_model_folder(t.model_dir, [0])
    seg, probs = predictor.predict_single_npy_array(image, {"spacing": list(img.GetSpacing())[::-1]},
                                                    save_or_return_probabilities=True)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
    assert seg.shape == written.shape == image.shape[1:]
    assert np.array_equal(seg, written)
    assert set(np.unique(seg)) == {0, 1, 2}
    assert probs.shape == (3, *image.shape[1:]) and np.allclose(probs.sum(0), 1, atol=1e-4)
    assert np.array_equal(probs.argmax(0), seg)
    with pytest.raises(SamunetError, match="'spacing' must be three positive numbers"):
        predictor.predict_single_npy_array(image, {"spacing": [1.0, 1.0]})
    with pytest.raises(SamunetError, match=r"expected a numpy array \(C, Z, Y, X\)"):
        predictor.predict_single_npy_array(image[0], {"spacing": [1.0, 1.0, 1.0]})


@pytest.fixture
def exported(trained, tmp_path):
    t, _ = trained
    out = tmp_path / "hippo_hybrid.zip"
    export_model_to_zip_entry(["-d", "4", "-o", str(out), "-c", "2d", "-tr", "samunetTrainer_hybrid_n4", "-f", "0"])
    return t, out


def test_exported_model_installs_into_empty_results_and_predicts_identically(exported, tmp_path, monkeypatch):
    t, zip_file = exported
    case, _, cli_out = _predict_slab(t, tmp_path, "original")
    with zipfile.ZipFile(zip_file) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("samunet_model.json"))
        fingerprint = json.loads(z.read(f"{NAME}/{MODEL}/dataset_fingerprint.json"))
    prefix = f"{NAME}/{MODEL}"
    assert {f"{prefix}/plans.json", f"{prefix}/dataset.json", f"{prefix}/fold_0/checkpoint_final.pth",
            f"{prefix}/fold_0/validation/summary.json", f"{prefix}/fold_0/progress.png"} <= names
    assert not any(n.endswith((".nii.gz", ".npy")) for n in names)  # no data, no embeddings
    with zipfile.ZipFile(zip_file) as z:  # the head's checkpoint and small files: the frozen encoder is not in it
        unpacked = sum(i.file_size for i in z.infolist())
    assert unpacked < (t.output / "checkpoint_final.pth").stat().st_size + 2e6
    enc = manifest["models"][0]["encoder"]
    assert enc["name"] == "lite_medsam" and enc["input_size"] == t.config["encoder_input_size"]
    assert enc["weights_sha256"] == t.encoder.weights_sha256
    assert fingerprint["dims"] == [3] and "case_identifiers" not in fingerprint and "spacings" not in fingerprint

    original = t.model_dir
    empty = tmp_path / "other_results"
    empty.mkdir()
    monkeypatch.setenv("samunet_results", str(empty))
    install_pretrained_model_from_zip_entry([str(zip_file)])
    installed = empty / NAME / MODEL
    assert (installed / "fold_0" / "checkpoint_final.pth").read_bytes() == \
        (original / "fold_0" / "checkpoint_final.pth").read_bytes()
    assert not [p for p in empty.iterdir() if p.name.startswith(".")]  # no staging folder left
    _, _, inst_out = _predict_slab(t, tmp_path, "inst")
    a = sitk.ReadImage(str(cli_out / f"{case}.nii.gz"))
    b = sitk.ReadImage(str(inst_out / f"{case}.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
    assert sitk.GetArrayFromImage(a).max() > 0  # the model segments something

    # installing again: identical files are left alone; a changed installed model is never replaced silently
    install_pretrained_model_from_zip_entry([str(zip_file)])
    plans = installed / "plans.json"
    plans.write_text(plans.read_text().replace('"seed"', '"seed_edited"'))
    edited = plans.read_text()
    refused(install_pretrained_model_from_zip_entry, str(zip_file),
            expect="1 file(s) of an installed model would be replaced; nothing was installed (pass --overwrite")
    assert plans.read_text() == edited
    install_pretrained_model_from_zip_entry([str(zip_file), "--overwrite"])
    assert plans.read_text() != edited


def test_unsafe_entries_and_foreign_encoders_are_refused_with_nothing_written(exported, tmp_path, monkeypatch):
    _, zip_file = exported
    results = tmp_path / "fresh_results"
    results.mkdir()
    monkeypatch.setenv("samunet_results", str(results))
    evil = _rezip(zip_file, tmp_path / "evil.zip", extra={f"{NAME}/../../escaped.txt": b"x"})
    refused(install_pretrained_model_from_zip_entry, str(evil),
            expect="'Dataset004_Hippocampus/../../escaped.txt': a path with '..' that would land outside")
    absolute = _rezip(zip_file, tmp_path / "abs.zip", extra={"/tmp/escaped.txt": b"x"})
    refused(install_pretrained_model_from_zip_entry, str(absolute), expect="an absolute or Windows path")

    def other_weights(m):
        m["models"][0]["encoder"]["weights_sha256"] = "0" * 64
    foreign = _rezip(zip_file, tmp_path / "foreign.zip", other_weights)
    refused(install_pretrained_model_from_zip_entry, str(foreign),
            expect="was trained on encoder 'lite_medsam' with weights SHA-256 0000000000000000..., but the "
                   "weights here differ")

    def sam(m):
        m["models"][0]["encoder"]["name"] = "sam_vit_b"
    for var in ("SAMUNET_SAM_CHECKPOINT_DIR", "SAMUNET_SAM_VIT_B_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    missing = _rezip(zip_file, tmp_path / "sam.zip", sam)
    refused(install_pretrained_model_from_zip_entry, str(missing),
            expect="encoder 'sam_vit_b' needed by the model is not available here")
    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 truncated")
    refused(install_pretrained_model_from_zip_entry, str(tmp_path / "not.zip"),
            expect="not a readable zip file")
    assert list(results.iterdir()) == [] and not (tmp_path.parent / "escaped.txt").exists()
