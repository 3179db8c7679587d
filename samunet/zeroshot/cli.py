"""``samunet_zeroshot``: evaluate SAM-type models with simulated prompts and no training."""
from __future__ import annotations

import argparse
import shlex
import sys

from samunet.cli import _entry, _setup_logging
from samunet.models.specs import ENCODER_SPECS
from samunet.utils import SamunetError


@_entry
def zeroshot_entry(argv=None):
    from samunet.zeroshot.automatic import AutomaticSettings
    from samunet.zeroshot.evaluate import MODES, ZeroShotSettings
    p = argparse.ArgumentParser(
        prog="samunet_zeroshot",
        description="Zero-shot evaluation on the preprocessed slices of a planned data set: prompt modes, "
                    "imprecise prompts, corrective clicks, object properties, trained heads beside. Writes "
                    "objects.csv, slices.csv, summary.json, plots and report.md to -o.")
    p.add_argument("-d", required=True, metavar="DATASET", help="data set id or name")
    p.add_argument("-c", default="2d", metavar="CONFIG", help="configuration (default 2d; must resize slices)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("--encoder", default=None, choices=sorted(ENCODER_SPECS),
                   help="model to evaluate (default: the plans' encoder)")
    p.add_argument("--checkpoint", default=None, help="weights file (default: as for the plans' encoder)")
    p.add_argument("--input_size", type=int, default=None,
                   help="encoder input size (default: the encoder's native size, what the model was trained at)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="prompt modes (default: all)")
    p.add_argument("--jitter", nargs="+", type=float, default=[0, 1, 2, 4, 8],
                   help="box shifts / point displacements in slice pixels for the robustness sweep "
                        "(default 0 1 2 4 8)")
    p.add_argument("--box_noise", type=float, default=0.1,
                   help="jittered-box mode: edge noise std relative to the box side (default 0.1)")
    p.add_argument("--clicks", type=int, default=5, help="interactive clicks per object (default 5; 0: none)")
    p.add_argument("--cases", type=int, default=None, help="number of cases (default: all)")
    p.add_argument("--slices_per_case", type=int, default=3,
                   help="slices per case, evenly spaced among those with an object (default 3; 0: all)")
    p.add_argument("--min_size", type=int, default=10, help="skip (and count) objects under this many pixels")
    p.add_argument("--grid", type=int, default=16, help="everything mode: points per side of the grid (default 16)")
    p.add_argument("--pred_iou_thresh", type=float, default=0.88, help="everything mode (default 0.88, SAM's)")
    p.add_argument("--stability_score_thresh", type=float, default=0.95, help="everything mode (default 0.95)")
    p.add_argument("--box_nms_thresh", type=float, default=0.7, help="everything mode (default 0.7)")
    p.add_argument("--multimask", choices=["auto", "yes", "no"], default="auto",
                   help="multimask output for point-only prompts (auto: yes for SAM, no for LiteMedSAM, whose "
                        "multimask outputs were never trained)")
    p.add_argument("--no_trained", action="store_true", help="do not compare trained heads")
    p.add_argument("--decoder", default=None, metavar="MODEL_FOLDER_OR_CHECKPOINT",
                   help="also evaluate this fine-tuned decoder (samunet_finetune_prompted), beside the pretrained "
                        "one, on its fold's validation cases only; writes pretrained/, finetuned/ and comparison.md")
    p.add_argument("--decoder_fold", default=None, help="fold of --decoder when it names a model folder")
    p.add_argument("--refine", default=None, metavar="MODEL_FOLDER",
                   help="instead: correct this trained model's predictions with --clicks clicks per object "
                        "(refine.md); with --decoder, by the pretrained and the fine-tuned decoder")
    p.add_argument("--refine_folds", nargs="+", default=None,
                   help="folds of --refine to ensemble (default: every trained fold); only cases none trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    _setup_logging()
    if a.cases is not None and a.cases < 1:
        raise SamunetError("--cases must be at least 1")
    jitter = tuple(int(j) if float(j).is_integer() else float(j) for j in a.jitter)
    settings = ZeroShotSettings(
        modes=tuple(dict.fromkeys(a.modes)), jitter=jitter, box_noise=a.box_noise, clicks=a.clicks,
        min_size=a.min_size, seed=a.seed, cases=a.cases, slices_per_case=a.slices_per_case or None,
        multimask={"auto": None, "yes": True, "no": False}[a.multimask],
        automatic=AutomaticSettings(points_per_side=a.grid, pred_iou_thresh=a.pred_iou_thresh,
                                    stability_score_thresh=a.stability_score_thresh, box_nms_thresh=a.box_nms_thresh))
    from pathlib import Path
    from samunet.zeroshot.evaluate import ZeroShotEvaluator
    from samunet.zeroshot.report import write_outputs
    if a.refine is not None and a.input_size is None:
        from samunet.paths import resolve_dataset_name
        from samunet.planning.plans import get_configuration, load_plans
        a.input_size = get_configuration(load_plans(resolve_dataset_name(a.d)), a.c)["encoder_input_size"]
    ev = ZeroShotEvaluator(a.d, a.c, encoder=a.encoder, checkpoint=a.checkpoint, input_size=a.input_size,
                           device=a.device, settings=settings,
                           compare_trained=not a.no_trained and a.refine is None, decoder=a.decoder,
                           decoder_fold=a.decoder_fold)
    command = "samunet_zeroshot " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    if a.refine is not None:
        from samunet.zeroshot.refine import run_refine, write_refine
        summary = write_refine(a.o, run_refine(ev, a.refine, a.refine_folds, a.clicks), ev.describe(), command)
        curves = "; ".join(f"{k} " + " / ".join(f"{x:.3f}" for x in d["mean_dice"])
                           for k, d in summary["decoders"].items())
        print(f"samunet_zeroshot --refine {summary['dataset']}: {summary['num_objects']} objects; mean Dice after "
              f"0-{a.clicks} clicks: {curves}; report in {a.o}/refine.md")
        return
    summaries = {}
    for name in ev.segmenters:
        result = ev.run(name)
        out = a.o if len(ev.segmenters) == 1 else str(Path(a.o) / name)
        summaries[name] = summary = write_outputs(out, result, ev.describe(), command)
        means = ", ".join(f"{k} {v['mean']:.3f}" for k, v in summary["dice_per_mode"].items())
        print(f"samunet_zeroshot {summary['dataset']} ({name} decoder): {summary['num_objects']} objects on "
              f"{summary['num_slices']} slices; mean Dice {means}; report in {out}/report.md")
    if len(summaries) > 1:
        from samunet.zeroshot.compare import write_comparison
        write_comparison(a.o, summaries, command)
        print(f"side by side: {a.o}/comparison.md")
