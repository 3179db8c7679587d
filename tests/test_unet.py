"""The from-scratch 2D U-Net baseline (``--head unet``): nnU-Net's topology for its canvas (the slice at about the
data's own resolution, as the hybrid head's image path), trained on augmented images through the normal training
loop, predicted through the normal prediction path."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import HIPPO, planned_hippocampus


def test_unet_block_follows_the_nnunet_rule_for_128_px():
    from samunet.models.unet import build_unet, unet_block
    b = unet_block([128, 128])
    # halve while >= 8 px: 128 64 32 16 8 4 -> six stages, bottleneck 4x4
    assert b["n_stages"] == 6
    assert b["strides"] == [[1, 1]] + [[2, 2]] * 5
    assert [s[0] for s in b["feature_map_sizes"]] == [128, 64, 32, 16, 8, 4]
    assert b["features_per_stage"] == [32, 64, 128, 256, 512, 512]
    assert b["kernel_sizes"] == [[3, 3]] * 6 and b["n_conv_per_stage"] == [2] * 6
    assert b["n_conv_per_stage_decoder"] == [2] * 5
    assert "nnU-Net" in b["unet_reason"]
    # the rule, not a table: other inputs get other depths
    assert unet_block([64, 64])["n_stages"] == 5 and unet_block([256, 256])["features_per_stage"][-2:] == [512, 512]
    m = build_unet(b, 3, 3)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    norms = [x for x in m.modules() if isinstance(x, torch.nn.InstanceNorm2d)]
    assert all(c.bias is not None for c in convs)
    assert convs[0].in_channels == 3 and convs[0].out_channels == 32 and convs[0].kernel_size == (3, 3)
    assert len(norms) == 2 * 6 + 2 * 5 and all(n.affine and n.eps == 1e-5 for n in norms)
    assert any(isinstance(x, torch.nn.LeakyReLU) for x in m.modules())
    with torch.no_grad():
        assert m(torch.rand(2, 3, 128, 128)).shape == (2, 3, 128, 128)


def test_deep_supervision_trains_every_decoder_stage_and_predicts_one_map():
    """The network blocks' ``deep_supervision``: in training the U-Net and the hybrid head give the logits of every
    decoder stage (highest resolution first) and the loss weighs them as nnU-Net does against the downsampled
    label; in evaluation one full-size map, the same weights as without it (checkpoints load either way)."""
    from samunet.models.hybrid import build_hybrid
    from samunet.models.encoders import build_encoder
    from samunet.models.unet import build_unet, unet_block
    from samunet.training.losses import deep_supervision_weights, dice_ce_loss, segmentation_loss
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    block = {**unet_block([32, 32]), "canvas_size": 32, "deep_supervision": True}
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 8:24, 8:20] = 1
    target[:, :, 28:] = -1  # padding stays ignored at every scale
    torch.manual_seed(0)
    enc = build_encoder("test_tiny", input_size=32)
    for model, args in ((build_unet(block, 3, 2), (torch.rand(2, 3, 32, 32),)),
                        (build_hybrid(block, enc, 2), (torch.rand(2, enc.embed_dim, enc.grid_size, enc.grid_size),
                                                       torch.rand(2, 3, 32, 32)))):
        model.train()
        outs = model(*args)
        assert [o.shape[-1] for o in outs] == [32 // 2 ** i for i in range(len(outs))] and len(outs) >= 3
        loss = segmentation_loss(outs, target)
        down = [torch.nn.functional.interpolate(target[:, None].float(), size=o.shape[-1], mode="nearest-exact")
                [:, 0].long() for o in outs]
        assert (down[1][:, :, 14:] == -1).all() and (down[1][:, 4:12, 4:10] == 1).all()
        w = deep_supervision_weights(len(outs))
        assert w[-1] == 0 and loss.item() == pytest.approx(
            sum(wi * dice_ce_loss(o, t).item() for wi, o, t in zip(w, outs, down)), rel=1e-5)
        loss.backward()
        model.eval()
        with torch.no_grad():
            full = model(*args)
        assert isinstance(full, torch.Tensor) and full.shape == (2, 2, 32, 32)
        assert torch.allclose(full, outs[0].detach(), atol=1e-5)  # the same network, its top output
        plain = build_unet(block | {"deep_supervision": False}, 3, 2) if hasattr(model, "net") else \
            build_hybrid(block | {"deep_supervision": False}, enc, 2)
        plain.load_state_dict(model.state_dict())


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """8 real Hippocampus cases; a short from-scratch U-Net training of fold 0 (no encoder anywhere)."""
    from samunet.training.trainer import run_training
    with planned_hippocampus(tmp_path_factory.mktemp("hippo_unet"), 8) as root:
        t = run_training(4, "2d", 0, head="unet", epochs=4, iterations_per_epoch=5, batch_size=4, device="cpu")
        yield t, root


def test_unet_plans_and_short_training(unet_run):
    t, root = unet_run
    plans = json.loads((Path(os.environ["samunet_preprocessed"]) / "Dataset004_Hippocampus" /
                        "samunetPlans.json").read_text())
    cfg = plans["configurations"]["2d"]
    # the canvas rule of the hybrid head: Hippocampus slices of about 36 x 50 px -> 64 px (not the 128 px encoder
    # input), so five stages
    assert cfg["initial_lr"]["unet"] == 1e-2 and cfg["unet"]["n_stages"] == 5
    assert cfg["unet"]["canvas_size"] == cfg["hybrid"]["canvas_size"] == 64 and t.head.input_size == 64
    assert t.train_data.batch([0, 1])["images"].shape[-2:] == (64, 64)
    assert t.encoder is None and t.cache is None and not t.use_cache
    assert isinstance(t.optimizer, torch.optim.SGD)
    g = t.optimizer.param_groups[0]
    assert g["momentum"] == 0.99 and g["nesterov"] and g["weight_decay"] == 3e-5
    assert t.output.name == "fold_0" and t.output.parent.name == "samunetTrainer_unet__samunetPlans__2d"
    log = t.log
    assert len(log["train_loss"]) == 4
    assert log["train_loss"][-1] < log["train_loss"][0] - 0.05, log["train_loss"]
    assert (t.output / "checkpoint_final.pth").is_file()
    summary = json.loads((t.output / "validation" / "summary.json").read_text())
    assert sorted(summary["mean"]) == ["1", "2"]
    debug = json.loads((t.output / "debug.json").read_text())
    assert debug["head"] == "unet" and debug["use_cache"] is False and debug["initial_lr"] == 1e-2
    assert not (Path(os.environ["samunet_preprocessed"]) / "Dataset004_Hippocampus" / "embeddings").exists() or \
        not any((Path(os.environ["samunet_preprocessed"]) / "Dataset004_Hippocampus" / "embeddings").rglob("*.npy"))


def test_unet_predicts_in_the_input_geometry_with_mirroring(unet_run, tmp_path):
    from samunet.inference.predict import EnsemblePredictor
    t, _ = unet_run
    case = t.val_ids[0]
    predictor = EnsemblePredictor(t.model_dir, folds=[0], device="cpu", tta=True)
    assert predictor.encoder is None  # a U-Net-only ensemble never builds the encoder
    assert predictor.tta is True  # trained with mirroring augmentation, so mirroring TTA is applied
    img = HIPPO / "imagesTr" / f"{case}_0000.nii.gz"
    out = tmp_path / f"{case}.nii.gz"
    predictor.predict_case([img], out)
    a, b = sitk.ReadImage(str(img)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(b))) <= {0, 1, 2}


def test_pretraining_reconstructs_and_fine_tuning_starts_from_it(unet_run, tmp_path, capsys):
    """samunet_pretrain (masked image modelling, labels unused) on the real slices of the fold, then
    samunet_train --head unet --pretrained_weights: the fine-tuning starts from the pre-trained values."""
    from samunet.cli import pretrain_entry, train_entry
    from samunet.models.run_checkpoint import load_checkpoint, save_checkpoint
    from samunet.training.pretrain import OUTPUT_LAYER, PRETRAINER, run_pretraining
    from samunet.training.trainer import Trainer
    scratch, _ = unet_run
    p = run_pretraining(4, "2d", 0, epochs=3, iterations_per_epoch=6, batch_size=4, device="cpu")
    assert p.output.parent.name == f"{PRETRAINER}__samunetPlans__2d"
    assert sorted(p.train_ids) == sorted(scratch.train_ids)  # every training case of the fold, not a subset
    assert p.train_data.sampler.with_any == []              # rows drawn uniformly: labels never consulted
    log = p.log
    assert log["val_loss"][-1] < log["val_loss"][0], log["val_loss"]          # masked pixels reconstructed better
    assert log["pseudo_dice"][-1] > log["pseudo_dice"][0], log["pseudo_dice"]  # R^2 on the masked pixels rises
    ckpt = p.output / "checkpoint_final.pth"
    pre = load_checkpoint(ckpt)["head_state"]

    t = Trainer(4, "2d", 0, head="unet", epochs=1, iterations_per_epoch=2, batch_size=4, device="cpu",
                pretrained_weights=ckpt)
    t.initialize()
    own = t.head.state_dict()
    body = [k for k in own if OUTPUT_LAYER not in k]
    assert len(body) > 20 and all(torch.equal(own[k], pre[k]) for k in body)
    used = sorted(k for k in own if OUTPUT_LAYER in k and k.endswith("weight"))[-1]  # the output layer in use
    assert not torch.equal(own[used], pre[used])  # freshly initialised, not the reconstruction layer
    assert t.output.parent.name == "samunetTrainer_unet_ssl__samunetPlans__2d"  # never overwrites the scratch run
    t.run()
    assert "initialised from" in t.text.path.read_text()
    assert load_checkpoint(t.output / "checkpoint_final.pth")["pretrained_weights"] == str(ckpt)

    # refused: a trained segmentation model, another data set's pre-training, another topology
    state = load_checkpoint(ckpt)
    capsys.readouterr()
    foreign = {"segmentation.pth": (scratch.output / "checkpoint_final.pth", "not a samunet_pretrain checkpoint"),
               "other_dataset.pth": ({**state, "dataset_name": "Dataset005_Prostate"}, "dataset_name"),
               "other_topology.pth": ({**state, "unet_architecture": {
                   **state["unet_architecture"], "n_stages": state["unet_architecture"]["n_stages"] + 1}},
                   "another topology")}
    for name, (what, message) in foreign.items():
        path = what if isinstance(what, Path) else tmp_path / name
        if not isinstance(what, Path):
            save_checkpoint(what, path)
        with pytest.raises(SystemExit) as e:
            train_entry(["4", "2d", "0", "--head", "unet", "--epochs", "1", "--iterations_per_epoch", "1",
                         "--batch_size", "2", "--device", "cpu", "--num_labeled_cases", "2",
                         "--pretrained_weights", str(path)])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after any log lines of the set-up
        assert e.value.code == 1 and last.startswith(f"error: {path}") and message in last and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        train_entry(["4", "2d", "0", "--head", "autosam", "--pretrained_weights", str(ckpt)])
    assert e.value.code == 1 and "--head unet" in capsys.readouterr().err
    # an interrupted pre-training resumes with --c; a finished one is not overwritten
    with pytest.raises(SystemExit) as e:
        pretrain_entry(["4", "2d", "0", "--epochs", "3", "--iterations_per_epoch", "6", "--batch_size", "4",
                        "--device", "cpu"])
    assert e.value.code == 1 and "--c" in capsys.readouterr().err


DDP_STEPS = """
import os, socket, sys, torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
dist.init_process_group("gloo", rank=0, world_size=1)
from samunet.models.encoders import build_encoder
from samunet.models.hybrid import build_hybrid
from samunet.models.unet import build_unet, unet_block
from samunet.training.losses import segmentation_loss
enc = build_encoder("test_tiny", input_size=128)
target = torch.randint(0, 2, (2, 64, 64))
for ds in (False, True):
    block = {**unet_block([64, 64]), "canvas_size": 64, "deep_supervision": ds}
    for model, args in ((build_unet(block, 3, 2), (torch.rand(2, 3, 64, 64),)),
                        (build_hybrid(block, enc, 2), (torch.rand(2, enc.embed_dim, 32, 32),
                                                       torch.rand(2, 3, 64, 64)))):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(2):  # an unused parameter is refused at the second step
            opt.zero_grad()
            segmentation_loss(ddp(*args), target).backward()
            opt.step()
print("trained")
"""


def test_unet_and_hybrid_train_under_distributed_data_parallel():
    """DistributedDataParallel (gloo, one process) refuses a model with a parameter the loss never reaches; the
    decoder's unused output convolutions (all but the last, or with deep supervision the lowest) take no gradient."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", DDP_STEPS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "trained", r.stderr[-3000:]
