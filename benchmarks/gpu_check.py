"""GPU check: does samunet's CUDA path run, and how fast, on one GPU and on all visible GPUs.

    python benchmarks/gpu_check.py [-o benchmarks/results/gpu_check.json] [--encoder lite_medsam] [--input_size N]
                                   [--checkpoint SAM_CHECKPOINT] [--seconds 10]
                                   [-m MODEL_DIR -i CASES_DIR]          # also time samunet_predict on real cases

Measures, for the GPU(s) PyTorch sees:

1. the frozen encoder's throughput (images/s) in float32 and under bfloat16 autocast, as achieved TFLOP/s and as a
   fraction of the device's dense bfloat16 peak (``samunet.models.gpu``), on GPU 0 and on all GPUs at once (one
   process per GPU, the way ``samunet_cache_embeddings`` under torchrun uses them);
2. training iterations/s of every head (autosam, cnn, linear, hybrid, unet) with bfloat16 autocast and the batch size
   the planner's device rule gives, on GPU 0 and with DistributedDataParallel (nccl) over all GPUs;
3. with ``-m`` and ``-i``: ``samunet_predict_from_modelfolder`` seconds per case on GPU 0 and with one part per GPU
   (torchrun), wall time including start-up.

Inputs of steps 1-2 are random tensors of the real shapes (speed does not depend on the values); step 3 reads real
cases. On a machine without CUDA it stops with ``error: no CUDA GPU ...`` and exit code 1, writing nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from samunet.utils import SamunetError, save_json  # noqa: E402

HEADS = ("autosam", "cnn", "linear", "hybrid", "unet")
DDP_ITERATIONS = 30  # timed steps per head when all GPUs train together


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(step, seconds: float, iterations: int | None = None) -> tuple[float, int]:
    """Calls of ``step`` per second over about ``seconds`` (or exactly ``iterations`` calls, as processes stepping
    together under DistributedDataParallel must) after a warm-up (CUDA synchronised)."""
    for _ in range(3):
        step()
    _sync()
    n, t0 = 0, time.perf_counter()
    while (n < iterations) if iterations else (time.perf_counter() - t0 < seconds or n == 0):
        step()
        n += 1
        if n % 5 == 0:
            _sync()
    _sync()
    return n / (time.perf_counter() - t0), n


def _peak(device) -> float | None:
    from samunet.models.gpu import gpu_facts
    return gpu_facts(device.index or 0)["bf16_tflops"] if device.type == "cuda" else None


def _encoder(args, device):
    from samunet.models.encoders import build_encoder
    return build_encoder(args.encoder, checkpoint=args.checkpoint, input_size=args.input_size, device=device,
                         optimise=False)


def encoder_throughput(args, device) -> dict:
    enc = _encoder(args, device)
    size, batch = enc.input_size, args.encoder_batch
    x = torch.rand(batch, 3, size, size, device=device)
    gflop = enc.spec.gflops(size)
    peak = _peak(device)
    out = {"encoder": enc.name, "input_size": size, "batch": batch, "gflop_per_image": round(gflop, 2)}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def step():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                         enabled=dtype is not None):
                enc.backbone(enc.normalise(x))
        rate, _ = _timed(step, args.seconds)
        ips = rate * batch
        out[name] = {"images_per_s": round(ips, 1), "tflops": round(ips * gflop / 1000, 2),
                     "fraction_of_bf16_peak": round(ips * gflop / 1000 / peak, 4) if peak else None}
    return out


def _head_model(head: str, enc, config: dict, num_classes: int = 3):
    from samunet.models.for_plans import build_model
    from samunet.models.hybrid import hybrid_block
    from samunet.models.unet import unet_block
    size = enc.input_size
    return build_model(head, enc, num_classes, unet_architecture=unet_block([size, size]),
                       hybrid_architecture={k: v for k, v in hybrid_block(config).items() if not k.endswith("reason")})


def head_training(args, device, dist_wrap=None) -> dict:
    """Iterations/s of each head's training step (bf16 autocast, the device rule's batch size)."""
    from samunet.models.gpu import prefer_channels_last
    from samunet.planning.device_rules import device_training_plan
    from samunet.training.losses import dice_ce_loss
    enc = _encoder(args, device)
    size = enc.input_size
    config = {"encoder_input_size": size, "iterations_per_epoch": 250, "median_slice_shape": [size, size],
              "patch_size": [size, size], "inplane_mode": "resize"}
    memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 4.0
    results = {}
    for head in HEADS:
        plan = device_training_plan(config, enc.spec, head, memory_gb, _peak(device), 1, 3)
        batch = plan["batch_size"] if device.type == "cuda" else 2
        model = prefer_channels_last(_head_model(head, enc, config).to(device), device)
        train = dist_wrap(model) if dist_wrap else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        e, g, _ = enc.spec.embedding_shape(size)
        emb = torch.randn(batch, e, g, g, device=device)
        canvas = getattr(model, "input_size", size)
        img = torch.rand(batch, 3, canvas if head == "hybrid" else size, canvas if head == "hybrid" else size,
                         device=device)
        target = torch.randint(0, 3, (batch, canvas if head == "hybrid" else size,
                                      canvas if head == "hybrid" else size), device=device)
        inputs = (img,) if head == "unet" else (emb, img) if head == "hybrid" else (emb,)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = dice_ce_loss(train(*inputs), target)
            loss.backward()
            opt.step()
        try:
            rate, _ = _timed(step, args.seconds, DDP_ITERATIONS if dist_wrap else None)
            results[head] = {"batch": batch, "iterations_per_s": round(rate, 2),
                             "samples_per_s": round(rate * batch, 1)}
        except Exception as exc:  # report the head that fails and go on with the others
            results[head] = {"batch": batch, "error": f"{type(exc).__name__}: {exc}"[:300]}
        model = train = opt = None  # frees the head's memory before the next one (step() sees these names)
        torch.cuda.empty_cache()
    return results


def _all_gpus_worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from samunet.training.distributed import init_distributed
    dist = init_distributed("cuda")
    enc = encoder_throughput(args, dist.device)
    dist.barrier()
    heads = head_training(args, dist.device, dist.wrap)
    save_json({"encoder": enc, "heads": heads}, Path(out_dir) / f"rank{rank}.json")
    torch.distributed.destroy_process_group()


def all_gpus(args, n: int) -> dict:
    import torch.multiprocessing as mp
    from samunet.training.distributed import _free_port
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_all_gpus_worker, args=(n, _free_port(), args, tmp), nprocs=n, join=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(n)]
    enc = {k: round(sum(r["encoder"][k]["images_per_s"] for r in ranks), 1) for k in ("fp32", "bf16")}
    heads = {h: ranks[0]["heads"][h] for h in HEADS}  # DDP: every rank steps together; rank 0's rate is the run's
    for h in heads:
        if "batch" in heads[h] and "iterations_per_s" in heads[h]:
            heads[h] = {**heads[h], "global_samples_per_s": round(heads[h]["samples_per_s"] * n, 1)}
    return {"gpus": n, "encoder_images_per_s_total": enc, "heads_ddp": heads}


def prediction(args, n: int) -> dict:
    cases = sorted(Path(args.i).glob("*_0000*"))
    if not cases:
        raise SamunetError(f"{args.i}: no input cases (CASE_0000.ext)")
    base = [sys.executable, "-c", "from samunet.cli import predict_from_modelfolder_entry as m; m()", "-m", args.m,
            "-i", args.i, "--device", "cuda", "--disable_progress_bar"]
    out = {"cases": len(cases)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(base + ["-o", f"{tmp}/one"], check=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
        out["one_gpu_seconds_per_case"] = round((time.perf_counter() - t0) / len(cases), 2)
        if n > 1:
            run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   "--no-python"] + base + ["-o", f"{tmp}/all"]
            t0 = time.perf_counter()
            subprocess.run(run, check=True)
            out[f"{n}_gpus_seconds_per_case"] = round((time.perf_counter() - t0) / len(cases), 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", default=str(REPO_ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--encoder", default="lite_medsam")
    p.add_argument("--checkpoint", default=None, help="SAM checkpoint for the sam_vit_* encoders")
    p.add_argument("--input_size", type=int, default=None, help="default: the encoder's native size")
    p.add_argument("--encoder_batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="timing window of each measurement")
    p.add_argument("-m", default=None, help="a trained model folder, to time samunet_predict")
    p.add_argument("-i", default=None, help="a folder of cases for -m")
    p.add_argument("--dry_run_cpu", action="store_true",
                   help="run steps 1-2 once each on the CPU at a small size, to check this script without a GPU "
                        "(its numbers mean nothing; nothing is written)")
    args = p.parse_args(argv)
    if args.dry_run_cpu:
        args.seconds, args.encoder_batch, args.input_size = 0.0, 2, args.input_size or 128
        device = torch.device("cpu")
        print(json.dumps({"encoder": encoder_throughput(args, device), "heads": head_training(args, device)},
                         indent=2))
        return 0
    try:
        from samunet.models.gpu import gpu_facts, require_cuda
        require_cuda()
        n = torch.cuda.device_count()
        torch.backends.cudnn.benchmark = True
        device = torch.device("cuda", 0)
        report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpus": [gpu_facts(i) for i in range(n)]}
        report["one_gpu"] = {"encoder": encoder_throughput(args, device), "heads": head_training(args, device)}
        if n > 1:
            report["all_gpus"] = all_gpus(args, n)
        if args.m and args.i:
            report["prediction"] = prediction(args, n)
    except SamunetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_json(report, args.o)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
