"""Outputs of a zero-shot run: per-object and per-(slice, class) CSV, summary JSON, plots, Markdown report."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from samunet.utils import atomic_write_bytes, save_json
from samunet.zeroshot.evaluate import CLICK_TARGETS

FACTORS = ("area", "compactness", "contrast", "aspect_ratio")
MODE_TITLES = {"everything_pred_iou": "everything (predicted-IoU match)",
               "everything_oracle": "everything (oracle match)", "point1": "1 centre point", "points5": "5 points",
               "points5_neg5": "5 pos + 5 neg points",
               "box": "box", "box_jitter": "jittered box", "box_point": "box + centre point"}


def _mode_columns(modes) -> list[str]:
    cols = []
    for m in modes:
        cols += ["everything_oracle", "everything_pred_iou"] if m == "everything" else [m]
    return cols


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "median": float("nan")}
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


def _write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def summarise(result: dict, description: dict) -> dict:
    st = description["settings"]
    objs, slices = result["objects"], result["slices"]
    cols = _mode_columns(st["modes"])
    summary = {**description, "cases": result["cases"], "num_slices": result["num_slices"],
               "num_objects": len(objs), "skipped_small_objects": len(result["skipped"]),
               "seconds": round(result["seconds"], 1)}
    summary["dice_per_mode"] = {c: _stats(r.get(c) for r in objs) for c in cols}
    labels = sorted({r["label"] for r in objs})
    summary["dice_per_mode_and_class"] = {
        str(objs[[r["label"] for r in objs].index(v)]["class"]): {c: _stats(r.get(c) for r in objs if r["label"] == v)
                                                                  for c in cols} for v in labels}
    if "everything" in st["modes"]:
        summary["everything_unfiltered_oracle"] = _stats(r.get("everything_unfiltered_oracle") for r in objs)
        auto = result["automatic"]
        summary["everything_filter_counts"] = {k: int(sum(a[k] for a in auto))
                                               for k in ("candidates", "after_iou", "after_stability", "after_nms")}
        summary["everything_max_pred_iou"] = max((a["max_pred_iou"] for a in auto), default=float("nan"))
    k = st["clicks"]
    if k:
        clicks = {"mean_dice": [_stats(r.get(f"click_{i + 1}") for r in objs)["mean"] for i in range(k)]}
        for t in CLICK_TARGETS:
            need = [r.get(f"clicks_to_{int(t * 100)}") for r in objs]
            reached = [x for x in need if not (isinstance(x, float) and math.isnan(x))]
            clicks[f"reached_{int(t * 100)}"] = len(reached) / max(1, len(objs))
            clicks[f"mean_clicks_to_{int(t * 100)}_if_reached"] = float(np.mean(reached)) if reached else None
            # the usual NoC@t: an object that never reaches t counts as the click budget
            clicks[f"noc_{int(t * 100)}"] = float(np.mean([x if x == x else k for x in need])) if need else None
        summary["clicks"] = clicks
    summary["box_shift"] = {str(d): _stats(r.get(f"box_shift_{d}") for r in objs)["mean"] for d in st["jitter"]}
    summary["point_shift"] = {str(d): _stats(r.get(f"point_shift_{d}") for r in objs)["mean"] for d in st["jitter"]}
    from scipy.stats import spearmanr
    corr = {}
    for c in cols:
        corr[c] = {}
        for f in FACTORS:
            pairs = [(r[f], r[c]) for r in objs if r.get(c) == r.get(c) and r.get(f) == r.get(f)]
            if len(pairs) >= 3 and len({p[1] for p in pairs}) > 1 and len({p[0] for p in pairs}) > 1:
                rho, p = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
                corr[c][f] = {"rho": float(rho), "p": float(p), "n": len(pairs)}
            else:
                corr[c][f] = {"rho": None, "p": None, "n": len(pairs)}
    summary["spearman_factor_vs_dice"] = corr
    trained = [k for k in (slices[0] if slices else {}) if k.startswith("trained_")]
    trained = sorted({k for r in slices for k in r if k.startswith("trained_")})
    comp = {}
    for t in trained:
        rows = [r for r in slices if r.get(t) is not None]
        comp[t[len("trained_"):]] = {"slice_classes": len(rows), "trained": _stats(r[t] for r in rows)["mean"],
                                     **{m: _stats(r.get(m) for r in rows)["mean"]
                                        for m in [*(m for m in st["modes"] if m != "everything"),
                                                  *(["everything_pred_iou"] if "everything" in st["modes"] else [])]}}
    summary["trained_vs_zeroshot_per_slice_class"] = comp
    return summary


def _plots(objs: list[dict], summary: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    st = summary["settings"]
    cols = _mode_columns(st["modes"])
    files = []

    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 4))
    data = [[r[c] for r in objs if r.get(c) == r.get(c)] for c in cols]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(cols) + 1), [MODE_TITLES.get(c, c).replace(" (", "\n(") for c in cols], fontsize=7)
    ax.set_ylabel("Dice per object")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['dataset']} {summary['configuration']}: zero-shot {summary['encoder']} "
                 f"({summary['encoder_input_size']} px), {summary['num_objects']} objects", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "dice_per_mode.png", dpi=110)
    plt.close(fig)
    files.append("dice_per_mode.png")

    if st["clicks"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        k = st["clicks"]
        ax.plot(range(1, k + 1), summary["clicks"]["mean_dice"], "o-", label="all objects")
        for cls in sorted({r["class"] for r in objs}):
            ax.plot(range(1, k + 1), [np.nanmean([r[f"click_{i + 1}"] for r in objs if r["class"] == cls])
                                      for i in range(k)], ".--", label=str(cls))
        for t in CLICK_TARGETS:
            ax.axhline(t, color="grey", lw=0.5)
        ax.set_xlabel("clicks")
        ax.set_ylabel("mean Dice")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "dice_vs_clicks.png", dpi=110)
        plt.close(fig)
        files.append("dice_vs_clicks.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    d = [float(x) for x in st["jitter"]]
    ax.plot(d, list(summary["box_shift"].values()), "o-", label="box shifted")
    ax.plot(d, list(summary["point_shift"].values()), "s-", label="centre point displaced")
    ax.set_xlabel("displacement (slice pixels, random direction)")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_jitter.png", dpi=110)
    plt.close(fig)
    files.append("dice_vs_jitter.png")

    main = "box" if "box" in cols else cols[0]
    fig, axes = plt.subplots(1, len(FACTORS), figsize=(4 * len(FACTORS), 3.6))
    for ax, f in zip(axes, FACTORS):
        x = [r[f] for r in objs]
        y = [r.get(main) for r in objs]
        ax.scatter(x, y, s=8, alpha=0.6)
        if f == "area":
            ax.set_xscale("log")
        rho = summary["spearman_factor_vs_dice"][main][f]["rho"]
        ax.set_title(f"{f}: Spearman rho {rho:.2f}" if rho is not None else f, fontsize=9)
        ax.set_xlabel(f)
        ax.set_ylabel(f"Dice ({MODE_TITLES.get(main, main)})")
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_factors.png", dpi=110)
    plt.close(fig)
    files.append("dice_vs_factors.png")
    return files


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(summary: dict, files: list[str], command: str | None = None) -> str:
    st = summary["settings"]
    cols = _mode_columns(st["modes"])
    size_note = ("the encoder's native input size" if summary["encoder_input_size"] == summary["native_input_size"]
                 else f"not the encoder's native {summary['native_input_size']} px")
    dec = summary.get("decoder", "pretrained")
    lines = [f"# {'Zero-shot' if dec == 'pretrained' else 'Fine-tuned decoder,'} {summary['encoder']} on "
             f"{summary['dataset']} ({summary['configuration']})", ""]
    if dec != "pretrained":
        lines += [f"Prompt encoder and mask decoder fine-tuned by {dec['trainer']} fold {dec['fold']} "
                  f"({dec['epoch']} epochs x {dec['iterations_per_epoch']} iterations x batch {dec['batch_size']}; "
                  f"`{dec['checkpoint']}`), evaluated on that fold's validation cases only.", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"- {len(summary['cases'])} cases, {summary['num_slices']} slices (at most {st['slices_per_case']} per case, "
        f"spread evenly over the slices with an object), {summary['num_objects']} objects (class x connected "
        f"component); {summary['skipped_small_objects']} objects under {st['min_size']} pixels skipped.",
        f"- Encoder input {summary['encoder_input_size']} px ({size_note}; the plans use "
        f"{summary['plans_input_size']} px for the trained heads). Dice is measured on the preprocessed slice grid.",
        "- Point prompts use " + ("multimask output, best predicted IoU" if st["multimask"] else
                                  "the single-mask output") + "; "
        f"seed {st['seed']}; {summary['seconds']:.0f} s on {summary['device']}.", "",
        "## Dice per prompt mode (per object)", "",
        "| mode | mean | median | std | n |", "|---|---|---|---|---|"]
    for c in cols:
        s = summary["dice_per_mode"][c]
        lines.append(f"| {MODE_TITLES.get(c, c)} | {_f(s['mean'])} | {_f(s['median'])} | {_f(s['std'])} | {s['n']} |")
    classes = summary["dice_per_mode_and_class"]
    lines += ["", "Mean Dice per class:", "", "| mode | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for c in cols:
        lines.append(f"| {MODE_TITLES.get(c, c)} | " + " | ".join(_f(classes[k][c]["mean"]) for k in classes) + " |")
    if "everything" in st["modes"]:
        a = st["automatic"]
        fc = summary["everything_filter_counts"]
        lines += ["", "## Everything mode", "",
                  f"{a['points_per_side']}x{a['points_per_side']} point grid, "
                  f"{'three masks' if a['multimask'] else 'one mask'} per point; kept if predicted IoU >= "
                  f"{a['pred_iou_thresh']} and stability >= "
                  f"{a['stability_score_thresh']} (offset {a['stability_score_offset']}), box NMS at "
                  f"{a['box_nms_thresh']}. Candidates over all slices: {fc['candidates']}; after the IoU filter "
                  f"{fc['after_iou']}; after the stability filter {fc['after_stability']}; after NMS "
                  f"{fc['after_nms']}. "
                  f"Highest predicted IoU of any candidate: {_f(summary['everything_max_pred_iou'])}.",
                  "", "| matching | mean Dice |", "|---|---|",
                  f"| oracle (best Dice among kept masks) | "
                  f"{_f(summary['dice_per_mode']['everything_oracle']['mean'])} |",
                  f"| predicted IoU (best-rated kept mask overlapping the object) | "
                  f"{_f(summary['dice_per_mode']['everything_pred_iou']['mean'])} |",
                  f"| oracle over all candidates, before filtering | "
                  f"{_f(summary['everything_unfiltered_oracle']['mean'])} |"]
    if st["clicks"]:
        c = summary["clicks"]
        lines += ["", "## Interactive clicks", "",
                  "Click 1 is the centre point; each next click is placed deepest inside the largest error region "
                  "(positive on missed foreground, negative on false foreground), with all clicks and the previous "
                  "low-resolution logits as prompts.", "",
                  "| clicks | " + " | ".join(str(i + 1) for i in range(st["clicks"])) + " |",
                  "|---|" + "---|" * st["clicks"],
                  "| mean Dice | " + " | ".join(_f(x) for x in c["mean_dice"]) + " |", "",
                  "| target Dice | objects reaching it | mean clicks if reached | NoC (unreached = budget) |",
                  "|---|---|---|---|"]
        for t in CLICK_TARGETS:
            p = int(t * 100)
            lines.append(f"| {t:.2f} | {100 * c[f'reached_{p}']:.0f}% | {_f(c[f'mean_clicks_to_{p}_if_reached'], 2)} | "
                         f"{_f(c[f'noc_{p}'], 2)} |")
    lines += ["", "## Robustness to imprecise prompts", "",
              f"Mean Dice with the tight box shifted, and the centre point displaced, by d slice pixels in a uniformly "
              f"random direction (the jittered-box mode moves each edge by Gaussian noise of {st['box_noise']} x the "
              "box side).", "",
              "| d (px) | " + " | ".join(str(d) for d in st["jitter"]) + " |", "|---|" + "---|" * len(st["jitter"]),
              "| box shifted | " + " | ".join(_f(v) for v in summary["box_shift"].values()) + " |",
              "| point displaced | " + " | ".join(_f(v) for v in summary["point_shift"].values()) + " |",
              "", "## Which object properties predict failure", "",
              "Spearman correlation of each property with the object's Dice (area in pixels; compactness = "
              "perimeter^2 / (4 pi area); contrast = |mean inside - mean in a 3-pixel ring| / pooled std; aspect "
              "ratio of the covariance ellipse).", "",
              "| mode | " + " | ".join(FACTORS) + " |", "|---|" + "---|" * len(FACTORS)]
    for c in cols:
        cells = []
        for f in FACTORS:
            v = summary["spearman_factor_vs_dice"][c][f]
            cells.append("n/a" if v["rho"] is None else f"{v['rho']:+.2f} (p={v['p']:.2g})")
        lines.append(f"| {MODE_TITLES.get(c, c)} | " + " | ".join(cells) + " |")
    comp = summary["trained_vs_zeroshot_per_slice_class"]
    if comp:
        modes = [m for m in next(iter(comp.values())) if m not in ("slice_classes", "trained")]
        lines += ["", "## Trained heads on the same slices", "",
                  "Dice per (slice, class) of the trained heads (prompt-free, plans' input size) beside the "
                  "zero-shot prompted masks (union of the class's objects), only on cases of each fold's validation "
                  "set, so never on a training case.", "",
                  "| trained model | (slice, class) pairs | trained | "
                  + " | ".join(MODE_TITLES.get(m, m) for m in modes) + " |", "|---|---|---|" + "---|" * len(modes)]
        for name, v in comp.items():
            lines.append(f"| {name} | {v['slice_classes']} | {_f(v['trained'])} | "
                         + " | ".join(_f(v[m]) for m in modes) + " |")
    elif summary.get("trained_models") == []:
        lines += ["", "No trained model of this data set and configuration was found, so none is compared."]
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files] + [""]
    return "\n".join(lines)


def write_outputs(out: str | Path, result: dict, description: dict, command: str | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(result["objects"], out / "objects.csv")
    _write_csv(result["slices"], out / "slices.csv")
    summary = summarise(result, description)
    if command:
        summary["command"] = command
    save_json(summary, out / "summary.json")
    files = _plots(result["objects"], summary, out) if result["objects"] else []
    atomic_write_bytes(out / "report.md", markdown(summary, files, command).encode("utf-8"))
    return summary
