"""How close is a warped cached embedding to the embedding of the warped image?

Training on the embedding cache warps the cached embedding grid with the same affine map as the image and the
label (``samunet/training/cached_augmentation.py``). The frozen encoder is not equivariant, so this is an
approximation; this benchmark measures it on real slices of a planned data set, for the ranges the augmentation
uses and beyond:

- ``warped``: mean cosine similarity, per embedding cell inside the warped slice, between the warped embedding of
  the slice and the embedding of the warped slice (what the augmentation approximates);
- ``unwarped``: the same between the *unwarped* embedding and the embedding of the warped slice (what training
  would see if the embedding were left alone while image and label were warped).

    samunet_preprocessed=... python benchmarks/embedding_warp.py -d 4 -c 2d --cases 20

writes ``benchmarks/results/embedding_warp_<dataset>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from samunet.paths import preprocessed_folder, resolve_dataset_name  # noqa: E402
from samunet.planning.plans import get_configuration, load_plans  # noqa: E402
from samunet.preprocessing.encoder_inputs import encoder_inputs, make_layout, slice_images  # noqa: E402
from samunet.training.cached_augmentation import region_centres, warp_grid  # noqa: E402


def _affine(centre, angle_deg=0.0, scale=1.0, flip_x=False, flip_y=False) -> torch.Tensor:
    a = math.radians(angle_deg)
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / scale
    m = m @ np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0])
    c = np.asarray(centre, float)
    t = np.zeros((1, 2, 3))
    t[0, :, :2] = m
    t[0, :, 2] = c - m @ c
    return torch.from_numpy(t).float()


TRANSFORMS = {
    "rotate 5 deg": dict(angle_deg=5), "rotate 10 deg": dict(angle_deg=10), "rotate 15 deg": dict(angle_deg=15),
    "rotate 30 deg": dict(angle_deg=30), "scale 0.85": dict(scale=0.85), "scale 1.15": dict(scale=1.15),
    "scale 1.25": dict(scale=1.25), "rotate 15 deg + scale 1.25": dict(angle_deg=15, scale=1.25),
    "mirror x": dict(flip_x=True), "mirror y": dict(flip_y=True),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", default="4")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--cases", type=int, default=20, help="cases, one slice with foreground (the middle one) each")
    p.add_argument("-o", "--output", default=None, help="default: benchmarks/results/embedding_warp_<dataset>")
    a = p.parse_args(argv)
    from samunet.models.encoders import build_encoder
    name = resolve_dataset_name(a.dataset)
    plans = load_plans(name)
    cfg = get_configuration(plans, a.configuration)
    data_dir = preprocessed_folder() / name / cfg["data_identifier"]
    idents = sorted(f.name[:-5] for f in data_dir.glob("*.json"))[:a.cases]
    enc = build_encoder(plans["encoder"]["name"], checkpoint=plans["encoder"].get("checkpoint"),
                        input_size=cfg["encoder_input_size"], optimise=True)
    t0 = time.time()
    scores = {k: {"warped": [], "unwarped": []} for k in TRANSFORMS}
    for ident in idents:
        data = np.load(data_dir / f"{ident}.npy", mmap_mode="r")
        props = json.loads((data_dir / f"{ident}.json").read_text())
        with_fg = sorted({s for v in props.get("slices_with_class", {}).values() for s in v})
        s = with_fg[len(with_fg) // 2] if with_fg else data.shape[1] // 2
        layout = make_layout(data.shape[2:], cfg)
        x = encoder_inputs(slice_images(data, s, cfg), layout)[0]          # (1, 3, P, P)
        if layout["mode"] == "sliding_window":
            x = x[:1]
        centre = region_centres([layout])[0]
        g = enc.grid_size
        region = torch.zeros(1, 1, layout["size"], layout["size"])
        h, w = layout["resized"] if layout["mode"] == "resize" else (layout["size"], layout["size"])
        region[..., :h, :w] = 1
        with torch.inference_mode():
            e = enc(x).float()
            thetas = [_affine(centre, **kw) for kw in TRANSFORMS.values()]
            xw = torch.cat([warp_grid(x, th) for th in thetas])
            ew = torch.cat([enc(xw[i:i + 8]).float() for i in range(0, len(xw), 8)])
            for k, th, target in zip(TRANSFORMS, thetas, ew):
                mask = warp_grid(torch.nn.functional.interpolate(region, size=(g, g), mode="area"), th)[0, 0] > 0.99
                mask &= torch.nn.functional.interpolate(region, size=(g, g), mode="area")[0, 0] > 0.99
                approx = warp_grid(e, th)[0]
                cos_w = torch.nn.functional.cosine_similarity(approx, target, dim=0)[mask]
                cos_u = torch.nn.functional.cosine_similarity(e[0], target, dim=0)[mask]
                scores[k]["warped"].append(float(cos_w.mean()))
                scores[k]["unwarped"].append(float(cos_u.mean()))
    rows = {k: {m: round(float(np.mean(v[m])), 4) for m in v} for k, v in scores.items()}
    out = Path(a.output) if a.output else ROOT / "benchmarks" / "results" / f"embedding_warp_{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"dataset": name, "configuration": a.configuration, "encoder": plans["encoder"]["name"],
              "input_size": cfg["encoder_input_size"], "cases": len(idents), "seconds": round(time.time() - t0, 1),
              "mean_cosine": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Warped embedding vs embedding of the warped image: {name} {a.configuration}", "",
             f"{plans['encoder']['name']} at {cfg['encoder_input_size']} px, {len(idents)} real slices (the middle "
             "slice with foreground of each case); mean cosine similarity per embedding cell inside the slice. "
             "`warped`: the cached embedding warped like the image (what cached-path augmentation trains on); "
             "`unwarped`: the cached embedding left as it is.", "",
             "`python benchmarks/embedding_warp.py -d " + str(a.dataset) + f" -c {a.configuration} --cases "
             f"{a.cases}`", "", "| transform | warped | unwarped |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['warped']:.3f} | {v['unwarped']:.3f} |" for k, v in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
