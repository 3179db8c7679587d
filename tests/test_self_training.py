"""Self-training (``samunet_train --self_training``) on real Hippocampus cases with the session's trained hybrid
model as the teacher: its pseudo-labels agree with the reference about as well as its validation Dice says, the
student's batches carry the pseudo-labels (never the reference) for half of each batch, and the wrong uses are
refused with a message."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import HIPPO, assert_refused, run_entry, tree_snapshot
from samunet.utils import SamunetError


def _dice(a, b, value) -> float:
    a, b = np.asarray(a) == value, np.asarray(b) == value
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_pseudo_labels_and_mixed_batches_follow_the_teacher(trained, tmp_path, monkeypatch):
    from samunet.training.data import CachedData
    from samunet.training.self_training import MixedData, PseudoLabels
    t, _ = trained
    pseudo = PseudoLabels(t)  # the session model, trained on 4 labelled cases, is the teacher of its own student
    assert pseudo.teacher == t.output / "checkpoint_final.pth"
    pseudo.folder = tmp_path / "pseudo_labels"
    others = t.val_ids[:2]  # cases the teacher never trained on, already in the embedding cache
    assert pseudo.build(others) == 2 and pseudo.build(others) == 0  # made once, then reused
    assert json.loads((pseudo.folder / "teacher.json").read_text())["teacher_sha256"] == pseudo.key["teacher_sha256"]
    data_dir = t.pp_folder / t.config["data_identifier"]
    summary = json.loads((t.output / "validation" / "summary.json").read_text())
    val_dice = {c["prediction_file"].split("/")[-1].split(".")[0]: np.mean([m["Dice"] for m in c["metrics"].values()])
                for c in summary["metric_per_case"]}
    for ident in others:
        label, ref = pseudo.load(ident), np.load(data_dir / f"{ident}_seg.npy")
        assert label.shape == ref.shape and label.dtype == np.int16 and set(np.unique(label)) <= {0, 1, 2}
        # the teacher's labels match the reference as its final validation (the same head without mirroring, in
        # the original geometry) did on the same case
        dice = np.mean([_dice(label, ref, v) for v in (1, 2)])
        assert abs(dice - val_dice[ident]) < 0.02 and dice > 0.2, (dice, val_dice[ident])

    canvas = t.hybrid_architecture["canvas_size"]
    segs = {i: pseudo.load(i) for i in others}
    student = CachedData(t.cache, others, t.num_classes, canvas, segs=segs)
    reference = CachedData(t.cache, others, t.num_classes, canvas)
    rows = np.arange(len(student))
    got, ref_batch = student.batch(rows)["target"], reference.batch(rows)["target"]
    assert not torch.equal(got, ref_batch)  # the teacher is not perfect: its labels, not the reference, are read
    from samunet.preprocessing.encoder_inputs import make_layout, target_inputs
    ident, (s, tile) = others[0], student.items[0][3]["rows"][5]
    layout = make_layout(segs[ident].shape[1:], {**t.config, "encoder_input_size": canvas})
    assert torch.equal(got[5], target_inputs(np.asarray(segs[ident][s]), layout, t.label_values)[tile])
    # foreground sampling follows the pseudo-labels too
    assert student.sampler.presence.any(1).sum() == sum(
        int((np.asarray(segs[i]) > 0).reshape(segs[i].shape[0], -1).any(1).sum()) for i in others)

    # --pseudo_label_tta: the teacher's labels with mirroring, as its final validation predicts for a teacher trained
    # with mirroring (this one was not: refused before any label is made; the same weights marked as mirrored, in a
    # results folder of their own: its mirrored prediction)
    from samunet.inference.predictor import predict_preprocessed
    from samunet.models.run_checkpoint import load_checkpoint, save_checkpoint
    from samunet.paths import results_folder
    t.pseudo_label_tta = True
    try:
        with pytest.raises(SamunetError, match="trained without mirroring"):
            PseudoLabels(t)
        teacher = tmp_path / "results" / pseudo.teacher.relative_to(results_folder())
        teacher.parent.mkdir(parents=True)
        save_checkpoint({**load_checkpoint(pseudo.teacher), "mirroring_axes": [0, 1]}, teacher)
        monkeypatch.setenv("samunet_results", str(tmp_path / "results"))
        mirrored = PseudoLabels(t)
        assert mirrored.teacher == teacher and mirrored.key["pseudo_label_tta"]
        mirrored.folder = tmp_path / "pseudo_labels_tta"
        assert mirrored.build(others[:1]) == 1
        data = np.load(data_dir / f"{others[0]}.npy", mmap_mode="r")
        probs = predict_preprocessed(data, t.config, t.encoder, [mirrored._teacher_head()], t.num_classes, tta=True,
                                     batch_size=t.batch_size)
        values = np.asarray(sorted(t.label_values))
        assert np.array_equal(mirrored.load(others[0]), values[probs.argmax(0)])
        assert not np.array_equal(mirrored.load(others[0]), pseudo.load(others[0]))  # not the labels without TTA
    finally:
        t.pseudo_label_tta = False

    labelled = CachedData(t.cache, t.train_ids, t.num_classes, canvas)
    mixed = MixedData(labelled, [student], 0.5)
    drawn = mixed.sampler.draw(np.random.default_rng(0), 8)
    assert (drawn < len(labelled)).sum() == 4 and len(mixed) == len(labelled) + len(student)
    b = mixed.batch(drawn, np.random.default_rng(1))
    assert b["target"].shape[0] == b["emb"].shape[0] == b["images"].shape[0] == 8


def test_self_training_refuses_what_it_cannot_do(hippo_env, tmp_path):
    from samunet.inference.predict import check_trainer_name, head_of
    from samunet.training.trainer import Trainer
    with pytest.raises(SamunetError, match="--num_labeled_cases N .* and/or --unlabeled_folder DIR"):
        Trainer(4, "2d", 0, head="hybrid", self_training=True)
    with pytest.raises(SamunetError, match="--self_training trains the hybrid head"):
        Trainer(4, "2d", 0, head="cnn", num_labeled_cases=4, self_training=True)
    # a student is a hybrid model to every command that reads trained models (samunet_predict -tr ..., export)
    assert check_trainer_name("samunetTrainer_hybrid_st_n4") == head_of("samunetTrainer_hybrid_st_n4") == "hybrid"
    assert check_trainer_name("samunetTrainer_hybrid_st") == head_of("samunetTrainer_hybrid_st") == "hybrid"
    for bad in ("samunetTrainer_cnn_st_n4", "samunetTrainer_cnn_st"):
        with pytest.raises(SamunetError, match="not a samunet trainer name"):
            check_trainer_name(bad)
    # a second run into a trained fold is refused before it encodes, labels or logs anything there
    out = hippo_env / "samunet_results" / "Dataset004_Hippocampus" / "samunetTrainer_hybrid_n4__samunetPlans__2d"
    before = {k: v for k, v in tree_snapshot(out).items() if not k.endswith(".run.lock")}
    assert_refused(run_entry("train_entry", "4", "2d", "0", "--head", "hybrid", "--num_labeled_cases", "4"),
                   "already holds a training run", "pass --c to continue it")
    assert {k: v for k, v in tree_snapshot(out).items() if not k.endswith(".run.lock")} == before
    # a student whose teacher was never trained: the command that trains it
    assert_refused(run_entry("train_entry", "4", "2d", "0", "--num_labeled_cases", "3", "--self_training",
                             "--epochs", "1", "--augmented_views", "0"),
                   "--self_training needs the teacher trained first", "--head hybrid --num_labeled_cases 3")
    # a folder of unlabelled images: only with --self_training, and a folder that holds images for these plans
    assert_refused(run_entry("train_entry", "4", "2d", "0", "--head", "hybrid", "--unlabeled_folder", str(tmp_path)),
                   "--unlabeled_folder gives the images a self-training student learns from; add --self_training")
    assert_refused(run_entry("train_entry", "4", "2d", "0", "--self_training", "--unlabeled_folder",
                             str(tmp_path / "nowhere")), f"error: {tmp_path / 'nowhere'}: --unlabeled_folder not found")
    (tmp_path / "scan.png").write_bytes(b"")
    assert_refused(run_entry("train_entry", "4", "2d", "0", "--self_training", "--unlabeled_folder", str(tmp_path)),
                   f"error: {tmp_path}: no images named CASE_XXXX.nii.gz")
    # a student continues only on the pseudo-labels it started with
    from samunet.training.self_training import check_resumed_student
    then = {"teacher_sha256": "a", "unlabeled_folder": "/scans"}
    check_resumed_student(dict(then), then, tmp_path)
    check_resumed_student({**then, "pseudo_label_tta": False}, then, tmp_path)  # a record from before the option
    for now in ({**then, "teacher_sha256": "b"}, {**then, "unlabeled_folder": None},
                {**then, "pseudo_label_tta": True}):
        with pytest.raises(SamunetError, match="train it afresh"):
            check_resumed_student(now, then, tmp_path)
    assert_refused(run_entry("train_entry", "4", "2d", "0", "--num_labeled_cases", "3", "--pseudo_label_tta"),
                   "--pseudo_label_tta says how a self-training student's labels are made; add --self_training")


def test_unlabelled_folder_gives_the_teacher_the_same_cases_as_the_data_set(trained, tmp_path, monkeypatch):
    """``--unlabeled_folder``: raw images (here two validation cases, named as the data set's own) preprocessed and
    encoded beside the data set's cache get the same pseudo-labels as the same cases read from the data set, and
    join the fold's pseudo-labelled cases in the student's batches."""
    from samunet.training.self_training import student_data
    from samunet.training.unlabelled_images import source_name
    t, _ = trained
    scans = tmp_path / "scans"
    scans.mkdir()
    for ident in t.val_ids[:2]:
        shutil.copy(HIPPO / "imagesTr" / f"{ident}_0000.nii.gz", scans)
    (scans / "README.txt").write_text("scans without labels")  # not an image: not a case
    messages = []
    monkeypatch.setattr(t, "output", tmp_path / "fold_0")  # pseudo-labels go here, not into the session's model
    monkeypatch.setattr(t, "text", messages.append)
    with pytest.raises(SamunetError, match="no unlabelled cases"):  # every training case of the fold labelled
        student_data(t, list(t.train_ids), t.hybrid_architecture["canvas_size"], None)
    monkeypatch.setattr(t, "unlabeled_folder", scans)
    canvas = t.hybrid_architecture["canvas_size"]
    data, record = student_data(t, t.train_ids + t.val_ids[:1], canvas, None)  # the fold's other case: one
    assert record["pseudo_labelled_cases"] == 3 and record["unlabeled_folder"] == str(scans.resolve())
    assert record["unlabeled_folder_cases"] == 2 and any(str(scans.resolve()) in m for m in messages)
    own = np.load(tmp_path / "fold_0" / "pseudo_labels" / f"{t.val_ids[0]}.npy")
    from_folder = tmp_path / "fold_0" / f"pseudo_labels_{source_name(scans)}"
    assert np.array_equal(np.load(from_folder / f"{t.val_ids[0]}.npy"), own)
    assert sorted(p.name for p in from_folder.glob("*.npy")) == sorted(f"{i}.npy" for i in t.val_ids[:2])
    root = t.pp_folder / "unlabeled" / source_name(scans)
    assert data.pseudo[1].items and (root / t.config["data_identifier"] / f"{t.val_ids[1]}.npy").is_file()
    assert len(data.pseudo) == 2 and len(data) == len(t.train_data) + len(data.pseudo[0]) + len(data.pseudo[1])
    rows = data.sampler.draw(np.random.default_rng(0), 16)
    part = np.searchsorted(data.bounds, rows, side="right") - 1
    assert (part == 0).sum() == 8 and (part == 1).any() and (part == 2).any() and rows.max() < len(data)
    batch = data.batch(rows, np.random.default_rng(1))
    assert batch["target"].shape[0] == batch["images"].shape[0] == 16
