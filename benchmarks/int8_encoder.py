"""int8 LiteMedSAM encoder: how far it moves the embeddings, a trained model's Dice and the zero-shot Dice.

    python benchmarks/int8_encoder.py [--images 4] [--model FOLD_FOLDER] [--zeroshot DATASET] [--cases 10]

samunet's int8 path (``build_encoder(..., optimise='int8')``, plans' ``cpu_precision: int8``) runs the fast
float32 network with the Linear layers of TinyViT's transformer stages (qkv, proj, fc1, fc2) in torch's dynamic
int8 linear: weights int8 per output channel, activations quantised per image. Beside it, for the choice of
scheme, torch.ao's ``quantize_dynamic`` of the shipped network's Linear layers with weights per tensor and per
channel.

1. **Embeddings** (real slices from ../shared/data at 256 px, as ``encoder_speed.py``): mean|a-r| / mean|r| and
   the smallest cosine similarity to the float32 embeddings; one thread, thread CPU time per image. Then one
   group of layers at a time in int8 (a stage's qkv / proj / fc1 / fc2, per-tensor weights), which shows where
   the error comes from, and the share of the float32 path's time the int8 path changes.
2. **Trained model** (``--model``: a trained fold folder, e.g. ``$samunet_results/Dataset004_Hippocampus/
   samunetTrainer_hybrid_n5__samunetPlans__2d/fold_0``): ``--cases`` of the fold's validation cases predicted by
   ``SamunetPredictor`` (no mirroring), once with the float32 encoder it was trained with and once with the
   int8 encoder swapped in (its heads never saw int8 embeddings: the harder case), each evaluated against the
   raw labels.
3. **Zero-shot** (``--zeroshot DATASET``): the box-prompt Dice of the pretrained decoder (``samunet_zeroshot``'s
   evaluator, 3 slices of each of ``--cases`` cases) with each encoder; the prompted decoder reads nothing but
   the embedding, so no trained image path can make up for an error.

The tolerance for an encoder path is a Dice change of at most 0.005. Writes benchmarks/results/int8_encoder.json
and .md.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
TOLERANCE = 0.005


AO_VARIANTS = ("torch.ao, weights per tensor", "torch.ao, weights per channel")
SAMUNET = "samunet int8 path"
KERNEL_AS_IS = "torch's int8 kernel as it computes on this CPU (saturating: no VNNI)"


def with_kernel_as_is(encoder):
    """The int8 encoder with torch's kernel forced on every layer, where the probe found it inexact."""
    encoder.backbone.quantise_linear_layers(exact_kernel=True)
    return encoder


def quantised(encoder, variant: str = AO_VARIANTS[0], names=None):
    """A copy of ``encoder`` with its Linear layers (or only those named) in torch.ao's dynamic int8."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
    qconfig = per_channel_dynamic_qconfig if variant == AO_VARIANTS[1] else default_dynamic_qconfig
    layers = names if names is not None else [torch.nn.Linear]
    with warnings.catch_warnings():  # torch.ao's eager quantisation warns that it is deprecated (it still works)
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(encoder), {k: qconfig for k in layers}, dtype=torch.qint8)


def embedding_check(n_images: int) -> dict:
    import torch
    from encoder_speed import SIZE, load_slices
    from samunet.models.encoders import build_encoder
    torch.set_num_threads(1)
    x, names = load_slices(n_images)
    x = torch.from_numpy(x)
    exact = build_encoder("lite_medsam", input_size=SIZE, optimise="exact")
    fast = build_encoder("lite_medsam", input_size=SIZE, optimise="fp32")

    def run(enc):
        best, out = float("inf"), None
        for _ in range(2):
            t = time.thread_time()
            with torch.no_grad():
                out = torch.cat([enc(x[i:i + 2]) for i in range(0, len(x), 2)])
            best = min(best, (time.thread_time() - t) / len(x))
        return out, best

    def compare(out, ref):
        return {"mean_rel_diff": float((out - ref).abs().mean() / ref.abs().mean()),
                "min_cosine": float(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min())}

    ref, t_exact = run(exact)
    _, t_fast = run(fast)
    seconds = {"float32 (as shipped)": t_exact, "float32 (samunet fast path)": t_fast}
    whole = {}
    for v in AO_VARIANTS:
        out, seconds[v] = run(quantised(exact, v))
        whole[v] = compare(out, ref)
    out, seconds[SAMUNET] = run(build_encoder("lite_medsam", input_size=SIZE, optimise="int8"))
    whole[SAMUNET] = compare(out, ref)
    from samunet.models.int8_linear import kernel_is_exact
    if not kernel_is_exact():  # what the int8 path would give here without samunet's exactness check
        out, seconds[KERNEL_AS_IS] = run(with_kernel_as_is(build_encoder("lite_medsam", input_size=SIZE,
                                                                         optimise="int8")))
        whole[KERNEL_AS_IS] = compare(out, ref)
    groups = collections.OrderedDict()
    for n, m in exact.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n and "mask_decoder" not in n:
            stage = n.split(".layers.")[1].split(".")[0]
            groups.setdefault(f"stage {stage} {n.rsplit('.', 1)[1]}", []).append(n)
    per_group = []
    for key, members in groups.items():
        with torch.no_grad():
            o = torch.cat([quantised(exact, names=members)(x[i:i + 2]) for i in range(0, len(x), 2)])
        per_group.append({"group": key, "layers": len(members), **compare(o, ref)})
    per_group.sort(key=lambda g: -g["mean_rel_diff"])
    # where the fast path spends its time: int8 can only speed up the matrix products of its Linear layers
    with torch.inference_mode():
        fast(x[:2])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fast(x[:2])
    self_time = {k.key: k.self_cpu_time_total for k in prof.key_averages()}
    linear_share = sum(v for k, v in self_time.items() if k in ("aten::addmm", "aten::mm")) / sum(self_time.values())
    return {"images": names, "size": SIZE, "seconds_per_image": seconds, "all_linear_int8": whole,
            "per_group": per_group, "fast_path_linear_share": linear_share}


def dice_check(model: Path, n_cases: int) -> dict:
    import torch
    from samunet.evaluation.evaluate import evaluate_folder
    from samunet.inference.samunet_predictor import SamunetPredictor
    from samunet.models.encoders import build_encoder
    from samunet.utils import load_json
    torch.set_num_threads(1)
    model = model.resolve()
    fold = int(model.name.split("_")[-1])
    plans = load_json(model.parent / "plans.json")
    raw = Path(os.environ["samunet_raw"]) / plans["dataset_name"]
    pp = Path(os.environ["samunet_preprocessed"]) / plans["dataset_name"]
    cases = sorted(load_json(pp / "splits_final.json")[fold]["val"])[:n_cases]
    ending = plans["file_ending"]
    labels = [v for v in plans["label_values"] if v != 0]
    predictor = SamunetPredictor(use_mirroring=False, device="cpu", allow_tqdm=False) \
        .initialize_from_trained_model_folder(model.parent, use_folds=(fold,))
    ensemble = predictor.ensemble
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for c in cases:
            for f in raw.glob(f"imagesTr/{c}_*{ending}"):
                os.symlink(f, src / f.name)
        for path in ("float32", SAMUNET):
            if path == SAMUNET:  # the same heads, the int8 encoder in place of the float32 one
                ensemble.encoder = build_encoder(plans["encoder"]["name"], input_size=ensemble.config[
                    "encoder_input_size"], optimise="int8")
            out = Path(tmp) / path.replace(" ", "_")
            t = time.time()
            predictor.predict_from_files(src, out)
            wall = time.time() - t
            s = evaluate_folder(raw / "labelsTr", out, labels, ending, num_processes=1, cases=cases)
            results[path] = {"foreground_dice": s["foreground_mean"]["Dice"], "wall_s": round(wall, 1)}
    results[SAMUNET]["dice_change"] = results[SAMUNET]["foreground_dice"] - results["float32"]["foreground_dice"]
    return {"model": f"{model.parent.name}/{model.name}", "cases": cases, "dice": results}


def zeroshot_check(dataset: str, n_cases: int) -> dict:
    """Box-prompt zero-shot Dice (the pretrained decoder, 3 slices of each of ``n_cases`` cases) with each encoder."""
    import torch
    from samunet.models.encoders import build_encoder
    from samunet.zeroshot.evaluate import ZeroShotEvaluator, ZeroShotSettings
    torch.set_num_threads(1)
    ev = ZeroShotEvaluator(dataset, settings=ZeroShotSettings(modes=("box",), jitter=(0,), clicks=0, cases=n_cases),
                           device="cpu", compare_trained=False)
    results = {}
    for path in ("float32", SAMUNET):
        if path == SAMUNET:
            ev.encoder = build_encoder(ev.encoder_name, input_size=ev.input_size, optimise="int8")
        r = ev.run()
        results[path] = {"box_dice": float(np.mean([o["box"] for o in r["objects"]])),
                         "objects": len(r["objects"]), "slices": r["num_slices"]}
    results[SAMUNET]["dice_change"] = results[SAMUNET]["box_dice"] - results["float32"]["box_dice"]
    return {"dataset": ev.dataset_name, "cases": r["cases"], "input_size": ev.input_size, "dice": results}


def markdown(r: dict) -> str:
    e = r["embeddings"]
    t = e["seconds_per_image"]
    lines = ["# int8 LiteMedSAM encoder: embedding and Dice changes", "",
             f"`python benchmarks/int8_encoder.py {r['argv']}` on {r['date']}; torch {r['torch']}; "
             f"{e['size']} px real slices: {', '.join(e['images'])}.", "",
             ("torch's int8 kernel is exact on this CPU (VNNI): the samunet int8 path runs it." if
              r.get("int8_kernel_exact", True) else
              "torch's int8 kernel saturates on this CPU (no VNNI): the samunet int8 path computes the same numbers "
              "in float32 (`samunet/models/int8_linear.py`); the kernel as it computes here is shown too."), "",
             "| encoder | s / image (1 thread, thread CPU) | mean rel. diff to float32 | min cosine |",
             "|---|---|---|---|",
             f"| float32 (as shipped) | {t['float32 (as shipped)']:.3f} | 0 | 1 |",
             f"| float32 (samunet fast path) | {t['float32 (samunet fast path)']:.3f} | < 1e-5 (same network) | 1 |"]
    lines += [f"| {v}{', the shipped network' if v in AO_VARIANTS else ''} | {t[v]:.3f} | "
              f"{e['all_linear_int8'][v]['mean_rel_diff']:.3f} | {e['all_linear_int8'][v]['min_cosine']:.4f} |"
              for v in AO_VARIANTS + (SAMUNET, KERNEL_AS_IS) if v in t]
    lines += ["", f"The fast float32 path spends {e['fast_path_linear_share']:.0%} of its time in the Linear layers' "
              "matrix products (torch profiler, self CPU time), the only part the int8 path changes.", "",
              f"One group of Linear layers in int8 ({AO_VARIANTS[0]}) at a time, the rest float32:", "",
              "| group | layers | mean rel. diff | min cosine |", "|---|---|---|---|"]
    lines += [f"| {g['group']} | {g['layers']} | {g['mean_rel_diff']:.3f} | {g['min_cosine']:.4f} |"
              for g in e["per_group"]]
    for key, title, metric in (("trained", "Trained model `{model}`, {n} validation cases (no mirroring)",
                                "foreground_dice"),
                               ("zeroshot", "Zero-shot box prompts, pretrained decoder, {dataset}: {n} cases, "
                                            "{objects} objects at {size} px", "box_dice")):
        d = r.get(key)
        if not d:
            continue
        f32 = d["dice"]["float32"]
        lines += ["", title.format(model=d.get("model"), n=len(d["cases"]), dataset=d.get("dataset"),
                                   objects=f32.get("objects"), size=d.get("input_size")) + ":", "",
                  "| encoder | Dice | change | within 0.005 |", "|---|---|---|---|",
                  f"| float32 | {f32[metric]:.4f} | | |"]
        q = d["dice"][SAMUNET]
        lines += [f"| {SAMUNET} | {q[metric]:.4f} | {q['dice_change']:+.4f} | "
                  f"{'yes' if abs(q['dice_change']) <= TOLERANCE else 'no'} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4, help="real slices for the embedding check")
    p.add_argument("--model", type=Path, default=None, help="a trained fold folder for the Dice check")
    p.add_argument("--cases", type=int, default=10, help="validation cases for the Dice checks")
    p.add_argument("--zeroshot", default=None, help="data set (planned, preprocessed) for the zero-shot box check")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    import torch
    r = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "torch": torch.__version__,
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "embeddings": embedding_check(a.images)}
    from samunet.models.int8_linear import kernel_is_exact
    r["int8_kernel_exact"] = kernel_is_exact()
    if a.model is not None:
        r["trained"] = dice_check(a.model, a.cases)
    if a.zeroshot is not None:
        r["zeroshot"] = zeroshot_check(a.zeroshot, a.cases)
    for folder in (os.environ.get("samunet_results"), os.environ.get("samunet_preprocessed")):
        if folder:  # the command line as a user would type it, without this machine's folders
            r["argv"] = r["argv"].replace(folder, "$samunet_results" if folder == os.environ.get(
                "samunet_results") else "$samunet_preprocessed")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "int8_encoder.json").write_text(json.dumps(r, indent=1))
    text = markdown(r)
    (a.out / "int8_encoder.md").write_text(text)
    print(text)
    changes = [abs(r[k]["dice"][SAMUNET]["dice_change"]) for k in ("trained", "zeroshot") if k in r]
    speed = r["embeddings"]["seconds_per_image"]["float32 (samunet fast path)"] / \
        r["embeddings"]["seconds_per_image"][SAMUNET]
    print(f"{SAMUNET}: {speed:.2f}x the fast float32 path"
          + (f"; largest Dice change {max(changes):.4f} ({'within' if max(changes) <= TOLERANCE else 'outside'} "
             f"{TOLERANCE})" if changes else ""))
    return r


if __name__ == "__main__":
    main()
