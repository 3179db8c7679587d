"""Cost of one training step of each embedding head on the CPU, beside nnU-Net's 2d network in the same run.

    python benchmarks/head_step.py [--batch 8] [--input_size 256] [--canvas Q] [--threads 1] [--steps 3] [--no_nnunet]

Rows:
* every embedding head (``autosam``, ``cnn``, ``linear``) as samunet trains it: a batch of LiteMedSAM-shaped
  embeddings with random values, 3-class labels at the encoder's input size, Dice + cross-entropy, AdamW and
  gradient clipping;
* the ``hybrid`` head and the from-scratch ``unet``: the same embeddings (hybrid) and random 3-channel images on
  their Q x Q canvas (``--canvas``; default the encoder input, as in sliding-window mode, where Q = P), with
  the topology the planner gives that canvas (nnU-Net's 2d rule), labels at Q, and nnU-Net's SGD as samunet
  trains them; the Hippocampus plans' setting is ``--input_size 128 --canvas 64``;
* ``autosam, segment-anything order``: the same head with the same weights, its decoder computed as
  segment-anything computes it (every image token projected to the attention width, NCHW transposed convolutions).
  It is the reference of the ``speed-up`` column, and the row shows what `models/token_attention.py` saves;
* ``nnU-Net 2d`` (when its environment exists, see setup_nnunet_env.sh): its network for the study's Hippocampus
  plans at its own patch and the same batch, deep-supervision Dice + cross-entropy and SGD with Nesterov momentum,
  run in nnU-Net's own environment (samunet never imports it). Its data augmentation is not included, and neither is
  the heads' data loading.

Process CPU time with one thread: far less disturbed by other load than wall time. The best of ``--steps`` steps
after a warm-up. Writes benchmarks/results/head_step.{json,md} (other batch, input or canvas settings:
head_step_b{B}_{P}px_canvas{Q}.{json,md}).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NNUNET_PYTHON = ROOT / "benchmarks" / ".venv-nnunet" / "bin" / "python"
NNUNET_PLANS = ROOT / "benchmarks" / "work" / "nnunet_preprocessed" / "Dataset004_Hippocampus" / "nnUNetPlans.json"

NNUNET_STEP = r'''
import json, sys, time
import numpy as np, torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
plans_file, batch, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
pm = PlansManager(plans_file)
cm = pm.get_configuration("2d")
net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, True)
pools = np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0)[:-1]
weights = np.array([1 / 2 ** i for i in range(len(pools))])
weights[-1] = 0
loss_fn = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": cm.batch_dice, "smooth": 1e-5, "do_bg": False,
                                                 "ddp": False}, {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())
opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
patch = list(cm.patch_size)
x = torch.randn(batch, 1, *patch)
target = torch.randint(0, 3, (batch, 1, *patch)).float()
targets = [target[:, :, ::int(p[0]), ::int(p[1])] for p in pools]
best = {"forward": float("inf"), "backward": float("inf"), "optimiser": float("inf")}
for step in range(steps + 1):
    opt.zero_grad()
    t0 = time.process_time()
    loss = loss_fn(net(x), targets)
    t1 = time.process_time()
    loss.backward()
    t2 = time.process_time()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    opt.step()
    t3 = time.process_time()
    if step:
        for k, v in zip(best, (t1 - t0, t2 - t1, t3 - t2)):
            best[k] = min(best[k], v)
print(json.dumps({"head": "nnU-Net 2d", "parameters": sum(p.numel() for p in net.parameters()), **best,
                  "step": sum(best.values()), "input": f"{batch} x {patch[0]} x {patch[1]} patch"}))
'''


def reference_decode(head, x):
    """The AutoSAM head's decoder in segment-anything's order of products (the reference row)."""
    import torch
    b, d, h, w = x.shape
    src = x + head.dense_bias.view(1, d, 1, 1)
    hs, keys = head.transformer(src, head.image_pe.expand(b, -1, -1, -1),
                                head.class_tokens.unsqueeze(0).expand(b, -1, -1))
    up = head.output_upscaling(keys.transpose(1, 2).reshape(b, d, h, w))
    hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(head.hypernetworks)], dim=1)
    return (hyper @ up.flatten(2)).view(b, hyper.shape[1], up.shape[2], up.shape[3])


def time_step(forward, params, target, steps: int, sgd: bool = False) -> dict:
    import torch
    from samunet.training.losses import dice_ce_loss
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5) if sgd else \
        torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    best = {"forward": float("inf"), "backward": float("inf"), "optimiser": float("inf")}
    for step in range(steps + 1):
        opt.zero_grad()
        t0 = time.process_time()
        loss = dice_ce_loss(forward(), target)
        t1 = time.process_time()
        loss.backward()
        t2 = time.process_time()
        torch.nn.utils.clip_grad_norm_(params, 12.0)
        opt.step()
        t3 = time.process_time()
        if step:  # the first step is a warm-up
            for k, v in zip(best, (t1 - t0, t2 - t1, t3 - t2)):
                best[k] = min(best[k], v)
    return {**best, "step": sum(best.values())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input_size", type=int, default=256, help="encoder input size (grid = size / 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--canvas", type=int, default=None,
                   help="the hybrid head's and the U-Net's canvas Q (default: the encoder input size)")
    p.add_argument("--heads", default="autosam,cnn,linear,hybrid,unet")
    p.add_argument("--no_nnunet", action="store_true")
    a = p.parse_args(argv)
    import torch
    sys.path.insert(0, str(ROOT))
    from samunet.models.encoders import build_encoder
    from samunet.models.for_plans import build_model
    from samunet.models.unet import unet_block
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    encoder = build_encoder("lite_medsam", optimise="exact", input_size=a.input_size)
    grid = encoder.grid_size
    emb = torch.randn(a.batch, encoder.embed_dim, grid, grid)
    target = torch.randint(0, 3, (a.batch, a.input_size, a.input_size))
    q = int(a.canvas or a.input_size)
    arch = {**unet_block([q, q]), "canvas_size": q}
    images = torch.randn(a.batch, 3, q, q)
    target_q = torch.randint(0, 3, (a.batch, q, q))
    rows = []
    names = [h for h in a.heads.split(",") if h]
    for name in names:
        if name == "hybrid":
            head = build_model(name, encoder, 3, hybrid_architecture=arch)
            forward, tgt, inp = (lambda: head(emb, images)), target_q, f"{a.batch} x {a.input_size} px + {q} px canvas"
        elif name == "unet":
            head = build_model(name, None, 3, unet_architecture=arch)
            forward, tgt, inp = (lambda: head(images)), target_q, f"{a.batch} x {q} px canvas"
        else:
            head = build_model(name, encoder, 3)
            forward, tgt, inp = (lambda: head(emb)), target, f"{a.batch} x {a.input_size} px"
        rows.append({"head": name, "parameters": sum(w.numel() for w in head.parameters()),
                     **time_step(forward, list(head.parameters()), tgt, a.steps, sgd=name in ("hybrid", "unet")),
                     "input": inp})
        print(rows[-1], flush=True)
        if name == "autosam":
            ref = time_step(lambda: head.to_input_size(reference_decode(head, emb)), list(head.parameters()),
                            target, a.steps)
            rows.append({"head": "autosam, segment-anything order", "parameters": rows[-1]["parameters"], **ref,
                         "input": rows[-1]["input"], "reference": True})
            rows[-2]["speed_up_over_reference"] = round(ref["step"] / rows[-2]["step"], 2)
            print(rows[-1], flush=True)
    nnunet_note = None
    if not a.no_nnunet and NNUNET_PYTHON.is_file() and NNUNET_PLANS.is_file():
        r = subprocess.run([str(NNUNET_PYTHON), "-c", NNUNET_STEP, str(NNUNET_PLANS), str(a.batch), str(a.threads),
                            str(a.steps)], capture_output=True, text=True)
        if r.returncode == 0:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        else:
            why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
            nnunet_note = f"nnU-Net row failed: {why}"
    elif not a.no_nnunet:
        nnunet_note = "nnU-Net row left out: run benchmarks/setup_nnunet_env.sh and the label-efficiency study's " \
                      "nnU-Net preprocessing first"
    if nnunet_note:
        print(nnunet_note)
    report = {"command": "python benchmarks/head_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "batch": a.batch, "input_size": a.input_size, "canvas": q, "threads": a.threads,
              "torch": torch.__version__,
              "rows": rows, "note": nnunet_note, "loadavg": open("/proc/loadavg").read().split()[:3]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    # the default setting writes head_step.{json,md}; others a name that says theirs
    name = "head_step" if (a.batch, a.input_size, q) == (8, 256, 256) else \
        f"head_step_b{a.batch}_{a.input_size}px_canvas{q}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# One training step per head (CPU)", "",
             f"`{report['command']}`: {a.threads} thread(s), process CPU time, best of {a.steps} steps after a "
             f"warm-up; heads on random LiteMedSAM-shaped embeddings (B, 256, {grid}, {grid}) with labels at "
             f"{a.input_size} px; the hybrid head and the U-Net on random images and labels on a {q} px canvas "
             f"(nnU-Net's 2d topology for it, SGD); load average {' '.join(report['loadavg'])}.", "",
             "| head | input | parameters | forward (s) | backward (s) | optimiser (s) | step (s) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        su = f"{r['speed_up_over_reference']:.2f}x" if "speed_up_over_reference" in r else \
            ("reference" if r.get("reference") else "")
        lines.append(f"| {r['head']} | {r['input']} | {r['parameters']:,} | {r['forward']:.3f} | "
                     f"{r['backward']:.3f} | {r['optimiser']:.3f} | {r['step']:.3f} | {su} |")
    if nnunet_note:
        lines += ["", nnunet_note]
    auto = next((r for r in rows if "speed_up_over_reference" in r), None)
    if auto:
        lines += ["", f"autosam step speed-up {auto['speed_up_over_reference']:.2f}x over segment-anything's order "
                  "of products (same weights, same run)"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    if auto:
        print(lines[-1])
    return report


if __name__ == "__main__":
    main()
