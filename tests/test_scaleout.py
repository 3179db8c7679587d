"""Scale-out on the CPU with real Hippocampus cases and the real LiteMedSAM encoder: a 2-process torchrun (gloo) run
that is killed and resumed, its checkpoint in a one-process samunet_predict, prediction in parts and the embedding
cache built in parts, both identical to one process; and the rules that need no run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import HIPPO

NAME = "Dataset004_Hippocampus"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
            sys.executable, "-c"]
TRAIN = "from samunet.cli import train_entry as m; m()"
PREDICT = "from samunet.cli import predict_entry as m; m()"
CACHE = "from samunet.scale_cli import cache_embeddings_entry as m; m()"
MODEL = "samunetTrainer_autosam_n4__samunetPlans__2d"


def _env(root: Path, results: Path | None = None, preprocessed: Path | None = None) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.update({k: str(root / k) for k in ("samunet_raw", "samunet_preprocessed", "samunet_results")})
    if results is not None:
        env["samunet_results"] = str(results)
    if preprocessed is not None:
        env["samunet_preprocessed"] = str(preprocessed)
    return env


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow  # about 2 minutes on 2 CPU cores; run with pytest -m slow
def test_torchrun_training_resumes_after_a_kill_and_its_parts_match_one_process(_hippo_trained, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): training killed after an epoch's checkpoint, resumed with --c; the final
    checkpoint predicts in one ordinary process; samunet_predict -num_parts 2 gives that prediction case for case;
    and the embedding cache built by two torchrun processes is the one a single process built."""
    root, session, _ = _hippo_trained  # the session's fold-0 cache (4 labelled + 4 validation cases) is reused
    results = tmp_path / "results"
    env = _env(root, results)
    args = ["4", "2d", "0", "--head", "autosam", "--num_labeled_cases", "4", "--epochs", "4",
            "--iterations_per_epoch", "2", "--batch_size", "4", "--patience", "0", "--device", "cpu"]
    fold = results / NAME / MODEL / "fold_0"
    run = subprocess.Popen(TORCHRUN + [TRAIN] + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (fold / "checkpoint_latest.pth").is_file() and run.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)  # as a batch system cancels a job: torchrun ends both training processes
    run.wait(timeout=120)
    assert not (fold / "checkpoint_final.pth").exists(), "the run finished before it could be killed"
    logs = list(fold.glob("training_log_*.txt"))
    assert len(logs) == 1  # only process 0 writes the log
    text = logs[0].read_text()
    assert "2 processes (gloo), global batch 4 = 2 x ~2 per process" in text and "learning rate" in text

    r = subprocess.run(TORCHRUN + [TRAIN] + args + ["--c"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    text = logs[0].read_text()
    resumed = text.split("resuming from checkpoint_latest.pth after epoch ")[1]
    done = int(resumed.split()[0])  # epochs the killed run finished and saved
    epochs = [int(line.split(": epoch ")[1].split(":")[0]) for line in resumed.splitlines() if ": epoch " in line]
    assert 1 <= done < 4 and epochs == list(range(done, 4)), (done, epochs)  # continues exactly after the kill
    import torch
    state = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 4 and len(state["log"]["train_loss"]) == 4
    assert not any(k.startswith("module.") for k in state["head_state"])  # the plain model, not its DDP wrapper
    assert not (fold / "checkpoint_latest.pth").exists() and not (fold / ".run.lock").exists()
    # final validation split over the two processes: every validation case written once, then evaluated
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert sorted(Path(c["prediction_file"]).name for c in summary["metric_per_case"]) == \
        sorted(f"{c}.nii.gz" for c in session.val_ids)

    # the checkpoint in ordinary (non-torchrun) samunet_predict processes, two parts running at once: together they
    # predict each case once, as the torchrun validation did (there from cached float16 embeddings, here from
    # embeddings computed anew, hence agreement rather than identity)
    cases = sorted(session.val_ids)[:2]
    inp = tmp_path / "in"
    inp.mkdir()
    for c in cases:
        shutil.copy(HIPPO / "imagesTr" / f"{c}_0000.nii.gz", inp)
    predict = [sys.executable, "-c", PREDICT, "-i", str(inp), "-d", "4", "-c", "2d", "-f", "0",
               "--num_labeled_cases", "4", "--device", "cpu", "--disable_progress_bar", "--disable_tta"]
    parts = [subprocess.Popen(predict + ["-o", str(tmp_path / "parts"), "-num_parts", "2", "-part_id", str(i)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in parts:
        assert p.wait() == 0, p.stderr.read()[-3000:]
    assert sorted(p.name for p in (tmp_path / "parts").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    for c in cases:
        part = _read(tmp_path / "parts" / f"{c}.nii.gz")
        assert part.shape == _read(HIPPO / "imagesTr" / f"{c}_0000.nii.gz").shape
        assert (part == _read(fold / "validation" / f"{c}.nii.gz")).mean() > 0.995, c

    # the embedding cache in two torchrun processes (one part each) against the session's one-process build:
    # a copy of the preprocessed data set whose own split makes fold 0 one training and one validation case
    pp = tmp_path / "pp"
    shutil.copytree(root / "samunet_preprocessed" / NAME, pp / NAME, ignore=shutil.ignore_patterns("embeddings"))
    pair = [session.train_ids[0], session.val_ids[0]]
    (pp / NAME / "splits_final.json").write_text(json.dumps([{"train": pair[:1], "val": pair[1:]}] * 5))
    r = subprocess.run(TORCHRUN + [CACHE, "-d", "4", "-c", "2d", "-f", "0", "--device", "cpu"],
                       env=_env(root, results, pp), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "part 0 of 2: 1 case(s)" in r.stdout and "part 1 of 2: 1 case(s)" in r.stdout, r.stdout
    built = next((pp / NAME / "embeddings").iterdir())
    reference = session.cache.folder
    assert built.name == reference.name
    for c in pair:
        for suffix in ("_target.npy", ".json"):
            assert (built / f"{c}{suffix}").read_bytes() == (reference / f"{c}{suffix}").read_bytes(), (c, suffix)
        # the embeddings (stored as float16): equal up to float rounding, since torchrun gives each process one
        # thread and the session's build used every core (the summation order of the matrix products depends on the
        # thread count, and a value lying near a float16 midpoint can round either way)
        a, b = np.load(built / f"{c}_emb.npy"), np.load(reference / f"{c}_emb.npy")
        assert a.shape == b.shape and a.dtype == b.dtype
        diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
        assert diff.max() <= 2e-3 * np.abs(b).max(), (c, float(diff.max()))
        assert (diff > 0).mean() < 0.05, (c, float((diff > 0).mean()))  # and almost every value is bit-identical
    assert not list(built.glob(".*.tmp"))


# ------------------------------------------------------------------ rules that need no run
def test_each_rank_draws_its_own_reproducible_batches_and_rank_0_those_of_one_process(_hippo_trained):
    from samunet.training.data import BackgroundBatches
    t = _hippo_trained[1]

    def rows(rank=None):
        kw = {} if rank is None else {"rank": rank}
        return [b["target"].numpy() for b in BackgroundBatches(t.train_data, 3, 4, t.seed, 2, **kw)]

    single, r0, r1, r1_again = rows(), rows(0), rows(1), rows(1)
    assert all(np.array_equal(a, b) for a, b in zip(single, r0))
    assert all(np.array_equal(a, b) for a, b in zip(r1, r1_again))
    assert not all(np.array_equal(a, b) for a, b in zip(r0, r1))


def test_parts_and_batch_shares_cover_everything_once():
    from samunet.training.distributed import Distributed, shard
    from samunet.utils import SamunetError
    items = [f"case_{i}" for i in range(7)]
    parts = [shard(items, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == items and all(parts)
    assert sum(Distributed(rank=r, world_size=3).batch_share(8) for r in range(3)) == 8
    with pytest.raises(SamunetError, match="part_id must lie"):
        shard(items, 3, 3)
    with pytest.raises(SamunetError, match="smaller than the 4 processes"):
        Distributed(rank=0, world_size=4).batch_share(2)


def test_device_rules_encode_on_the_fly_only_where_the_encoder_is_cheap():
    from samunet.models.specs import get_encoder_spec
    from samunet.planning.device_rules import device_training_plan
    config = {"encoder_input_size": 128, "iterations_per_epoch": 250}
    lite = device_training_plan(config, get_encoder_spec("lite_medsam"), "autosam", 141, 989.0)
    assert lite["on_the_fly"] and "full augmentation" in lite["on_the_fly_reason"]
    vit_h = device_training_plan({"encoder_input_size": 1024, "iterations_per_epoch": 250},
                                 get_encoder_spec("sam_vit_h"), "autosam", 141, 989.0)
    assert not vit_h["on_the_fly"] and "over the 60 s budget" in vit_h["on_the_fly_reason"]
    assert not device_training_plan(config, get_encoder_spec("lite_medsam"), "hybrid", 141, 989.0)["on_the_fly"]
    small = device_training_plan(config, get_encoder_spec("lite_medsam"), "autosam", 1, 989.0)  # 1 GB
    assert 2 <= small["batch_size"] < lite["batch_size"] <= 32


def test_scale_out_commands_refuse_bad_input_with_a_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", TRAIN, "4", "2d", "0", "-num_gpus", "2"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "error: -num_gpus 2: PyTorch sees 0 CUDA GPU(s)" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", CACHE, "-d", "4", "-c", "2d", "-num_parts", "2", "-part_id", "2"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "part_id must lie in 0..num_parts-1" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"),
                        "-o", str(tmp_path / "gpu.json")], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: no CUDA GPU"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "gpu.json").exists()
