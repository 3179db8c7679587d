"""Clicks on top of a trained model: a user corrects a trained head's (or fold ensemble's) prediction.

``samunet_zeroshot -d D -c 2d --refine MODEL_FOLDER [--refine_folds 0] [--decoder FINETUNED]`` takes the slices the
zero-shot suite chooses, on cases no chosen fold trained on, and per object (class x connected component):

- click 0 is the trained model's prediction of the object (any head: those on the embedding, the hybrid head, the
  U-Net; through the predictor, without test-time augmentation): its mask of the class, within the object's share
  of the slice (the pixels nearer to this component than to another of the class, so stray false positives count);
- each click goes deepest into the largest error region of the current mask (positive on missed foreground,
  negative on false foreground); the decoder gets all clicks so far, the box of the model's prediction, and as
  mask prompt the model's probabilities (first click) or its own previous low-resolution logits (later clicks);
- Dice after 0-K clicks and the clicks needed for 0.85 / 0.90 (0 when the model alone reaches it), for the
  pretrained decoder and, with ``--decoder``, the fine-tuned one on the same clicks' rules.

Outputs: ``refine.csv`` (per object), ``refine.json``, ``refine.md``, ``refine_clicks.png``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from samunet.inference.predictor import slice_probabilities
from samunet.preprocessing.encoder_inputs import make_layout, slice_images
from samunet.preprocessing.prompt_geometry import SliceGeometry
from samunet.preprocessing import prompt_simulation as P
from samunet.utils import SamunetError, atomic_write_bytes, save_json

TARGETS = (0.85, 0.90)


def load_models(ev, model_folder, folds=None, checkpoint: str = "checkpoint_final.pth") -> tuple[list, set]:
    """Trained heads of ``model_folder`` (the listed folds, else every trained fold) on ``ev``'s encoder, and the
    cases none of them trained on."""
    from samunet.models.encoders import encoder_identity
    from samunet.models.for_plans import model_from_state
    from samunet.models.run_checkpoint import check_compatible, load_checkpoint
    from samunet.models.specs import IMAGE_MODELS
    folder = Path(model_folder)
    if int(ev.config["encoder_input_size"]) != ev.input_size:
        raise SamunetError(f"--refine needs the plans' encoder input size ({ev.config['encoder_input_size']} px), "
                           f"the size the model was trained at; --input_size {ev.input_size} was given")
    paths = [folder / f"fold_{f}" / checkpoint for f in folds] if folds else sorted(folder.glob(f"fold_*/{checkpoint}"))
    if not paths:
        raise SamunetError(f"{folder}: no fold_K/{checkpoint} (train the model with samunet_train first)")
    heads, trained_on = [], set()
    for path in paths:
        state = load_checkpoint(path)
        expected = {"dataset_name": ev.dataset_name, "configuration": ev.configuration,
                    "preprocessing_identity": ev.config["preprocessing_identity"]}
        if state.get("head") not in IMAGE_MODELS:   # the U-Net has no encoder to match
            expected["encoder_identity"] = encoder_identity(ev.encoder)
        check_compatible(state, path, expected)
        heads.append(model_from_state(state, ev.encoder).to(ev.device).eval())
        trained_on |= set(state["train_cases"])
    return heads, trained_on


def _object_cell(seg_s: np.ndarray, obj) -> np.ndarray:
    """Pixels nearer to this component than to any other component of its class."""
    comps, n = ndimage.label(seg_s == obj.label)
    if n <= 1:
        return np.ones(seg_s.shape, bool)
    idx = ndimage.distance_transform_edt(comps == 0, return_indices=True)[1]
    return comps[idx[0], idx[1]] == obj.component


def _clicks_to(dices: list[float], t: float) -> float:
    return next((k for k, d in enumerate(dices) if d >= t), float("nan"))


@torch.no_grad()
def refine_slice(ev, heads, case: str, s: int, data, seg, clicks: int) -> list[dict]:
    seg_s = np.asarray(seg[s])
    objects = P.find_objects(seg_s, ev.label_values, ev.settings.min_size)[0]
    layout = make_layout(seg_s.shape, ev.zs_config)
    geometry = SliceGeometry(layout, ev.segmenter.low_res_size)
    emb = ev._embed(slice_images(data, s, ev.config)[:1], layout, ev.encoder)
    probs = slice_probabilities(data, s, ev.config, ev.encoder, heads, len(ev.label_values), ev.device)
    predicted = np.asarray(ev.label_values)[probs.argmax(0)]
    rows = []
    for o in objects:
        cell = _object_cell(seg_s, o)
        pred0 = (predicted == o.label) & cell
        prob0 = probs[ev.label_values.index(o.label)] * cell
        box = P.tight_box(pred0)[None] if pred0.any() else None
        row = {"case": case, "slice": s, "label": o.label, "class": ev.class_names.get(o.label, str(o.label)),
               "component": o.component, "area": o.area, "model": P.dice(pred0, o.mask)}
        for name, segmenter in ev.segmenters.items():
            ev.segmenter = segmenter
            pred, mask_in, pts, labs, dices = pred0, geometry.mask_prompt(prob0[None]), [], [], [row["model"]]
            for _ in range(clicks):
                c = P.correction_click(pred, o.mask)
                if c is None:
                    dices.append(dices[-1])
                    continue
                pts.append(c[0])
                labs.append(c[1])
                mask_in, _, m = ev._decode(emb, geometry, points=np.array([pts], np.float64),
                                           labels=np.array([labs]), boxes=box, mask_input=mask_in)
                pred = m[0].numpy()
                dices.append(P.dice(pred, o.mask))
            row.update({f"{name}_click_{k}": d for k, d in enumerate(dices)})
            row.update({f"{name}_clicks_to_{int(t * 100)}": _clicks_to(dices, t) for t in TARGETS})
        rows.append(row)
    return rows


def run_refine(ev, model_folder, folds=None, clicks: int = 5) -> dict:
    heads, trained_on = load_models(ev, model_folder, folds)
    ev.only_cases = (ev.only_cases if ev.only_cases is not None else
                     {p.name[:-len(".json")] for p in ev.data_dir.glob("*.json")}) - trained_on
    if not ev.only_cases:
        raise SamunetError(f"{model_folder}: every case was a training case of one of the chosen folds; choose "
                           "folds with --refine_folds so that some validation cases remain")
    rows = []
    for case in tqdm(ev.choose_cases(), desc="refine cases"):
        data = np.load(ev.data_dir / f"{case}.npy", mmap_mode="r")
        seg = np.load(ev.data_dir / f"{case}_seg.npy", mmap_mode="r")
        for s in ev.choose_slices(np.asarray(seg)):
            rows += refine_slice(ev, heads, case, s, data, seg, clicks)
    if not rows:
        raise SamunetError("no object to refine on the chosen slices (lower --min_size or choose more --cases)")
    return {"rows": rows, "clicks": clicks, "model_folder": str(model_folder), "folds": folds,
            "num_models": len(heads), "decoders": list(ev.segmenters)}


def _mean(rows, key) -> float:
    v = [r[key] for r in rows if not (isinstance(r[key], float) and math.isnan(r[key]))]
    return float(np.mean(v)) if v else float("nan")


def summarise_refine(result: dict, description: dict) -> dict:
    rows, k = result["rows"], result["clicks"]
    out = {**description, **{x: result[x] for x in ("model_folder", "folds", "num_models", "clicks")},
           "num_objects": len(rows), "cases": sorted({r["case"] for r in rows}), "decoders": {}}
    for name in result["decoders"]:
        d = {"mean_dice": [_mean(rows, f"{name}_click_{i}") for i in range(k + 1)]}
        for t in TARGETS:
            need = [r[f"{name}_clicks_to_{int(t * 100)}"] for r in rows]
            reached = [x for x in need if x == x]
            d[f"reached_{int(t * 100)}"] = len(reached) / len(rows)
            d[f"noc_{int(t * 100)}"] = float(np.mean([x if x == x else k for x in need]))
        out["decoders"][name] = d
    return out


def write_refine(out, result: dict, description: dict, command: str | None = None) -> dict:
    from samunet.zeroshot.report import _f, _write_csv
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(result["rows"], out / "refine.csv")
    summary = summarise_refine(result, description)
    if command:
        summary["command"] = command
    save_json(summary, out / "refine.json")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = result["clicks"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, d in summary["decoders"].items():
        ax.plot(range(k + 1), d["mean_dice"], "o-", label=f"{name} decoder")
    ax.set_xlabel("clicks (0: the trained model alone)")
    ax.set_ylabel("mean Dice per object")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "refine_clicks.png", dpi=110)
    plt.close(fig)
    lines = [f"# Correcting {Path(result['model_folder']).name} with clicks, {summary['dataset']}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"{summary['num_objects']} objects on slices of {len(summary['cases'])} cases that none of the "
              f"{summary['num_models']} model(s) trained on. Click 0 is the model's own mask of the object; each "
              "click goes deepest into the largest error region; the decoder sees the clicks, the box of the "
              "model's mask and the model's probabilities (then its own previous logits) as mask prompt.", "",
              "| decoder | " + " | ".join(f"{i} clicks" for i in range(k + 1)) + " |", "|---|" + "---|" * (k + 1)]
    for name, d in summary["decoders"].items():
        lines.append(f"| {name} | " + " | ".join(_f(x) for x in d["mean_dice"]) + " |")
    lines += ["", "| decoder | " + " | ".join(f"reach {t:.2f} (NoC)" for t in TARGETS) + " |",
              "|---|" + "---|" * len(TARGETS)]
    for name, d in summary["decoders"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * d[f'reached_{int(t * 100)}']:.0f}% "
                                                   f"({_f(d[f'noc_{int(t * 100)}'], 2)})" for t in TARGETS) + " |")
    lines += ["", "![clicks](refine_clicks.png)", ""]
    atomic_write_bytes(out / "refine.md", "\n".join(lines).encode("utf-8"))
    return summary
