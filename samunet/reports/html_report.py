"""``samunet_report``: one HTML page for a fold's validation or any evaluated prediction folder.

The page holds the mean Dice / HD95 / NSD per class, a per-case table sorted worst first, overlays (image,
reference, prediction) of the worst and best cases, the training progress plot, and the plans' choices with the
planner's reason for each. It is written as ``report.html`` with its images in ``report_files/`` (relative
links, so the folder can be copied or served as it is).

    write_report("samunet_results/Dataset004_Hippocampus/samunetTrainer_autosam__samunetPlans__2d/fold_0")
"""
from __future__ import annotations

import html
import logging
import shutil
from pathlib import Path

import numpy as np

from samunet.paths import preprocessed_folder, raw_folder
from samunet.reports.overlays import legend_html, write_overlay
from samunet.utils import SamunetError, atomic_write_bytes, check_writable_folder, load_json

logger = logging.getLogger("samunet")

# plans fields whose planner reason is stored under another name
REASON_OF = {"slice_axis_reason": "slice_axis", "spacing_reason": "target_spacing_inplane",
             "input_size_reason": "encoder_input_size", "cache_reason": "cache_embeddings",
             "early_stopping_reason": "early_stopping_patience", "training_reason": "num_epochs"}


def find_sources(folder, images_folder=None, need_summary: bool = True) -> dict:
    """Where the summary, plans, images, references and progress plot of ``folder`` are: a fold folder (its
    ``validation``), a fold's ``validation`` folder, or a ``samunet_predict`` output folder (evaluated with
    samunet_evaluate_folder when ``need_summary``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SamunetError(f"{folder}: folder not found")
    if (folder / "validation").is_dir() and (folder / "debug.json").is_file():
        folder = folder / "validation"
    summary = folder / "summary.json"
    if need_summary and not summary.is_file():
        raise SamunetError(f"{summary}: not found; evaluate the folder first (samunet_evaluate_folder, or the final "
                           "validation of samunet_train)")
    src = {"folder": folder, "summary": load_json(summary) if summary.is_file() else None, "plans": None,
           "dataset_json": None, "progress": None, "references": None,
           "images": Path(images_folder) if images_folder else None, "title": str(folder)}
    fold = folder.parent
    if (fold / "debug.json").is_file() and (fold.parent / "plans.json").is_file():  # a fold's final validation
        src.update(plans=load_json(fold.parent / "plans.json"), dataset_json=load_json(fold.parent / "dataset.json"),
                   title=f"{fold.parent.name} {fold.name} validation")
        src["progress"] = fold / "progress.png"
        src["images"] = src["images"] or raw_folder() / src["plans"]["dataset_name"] / "imagesTr"
        src["references"] = preprocessed_folder() / src["plans"]["dataset_name"] / "gt_segmentations"
    elif (folder / "predict_from_raw_data_args.json").is_file():  # samunet_predict's output
        args = load_json(folder / "predict_from_raw_data_args.json")
        src.update(plans=load_json(folder / "plans.json"), dataset_json=load_json(folder / "dataset.json"),
                   title=f"{Path(args['model_folder']).name} folds {', '.join(args['folds'])}: {folder.name}")
        src["progress"] = Path(args["model_folder"]) / f"fold_{args['folds'][0]}" / "progress.png"
        src["images"] = src["images"] or Path(args["input_folder"])
    if src["progress"] is not None and not src["progress"].is_file():
        src["progress"] = None
    return src


def _reference(entry: dict, plans: dict | None) -> Path | None:
    """The case's reference file: where the summary says, else the data set's copy (the folder may have moved)."""
    name = Path(entry["reference_file"]).name
    candidates = [Path(entry["reference_file"])]
    if plans:
        candidates += [preprocessed_folder() / plans["dataset_name"] / "gt_segmentations" / name,
                       raw_folder() / plans["dataset_name"] / "labelsTr" / name]
    return next((c for c in candidates if c.is_file()), None)


def _case_rows(summary: dict, folder: Path, plans: dict | None) -> list[dict]:
    rows = []
    for entry in summary["metric_per_case"]:
        name = Path(entry["prediction_file"]).name
        m = entry["metrics"]
        dice = [m[c]["Dice"] for c in m]
        rows.append({"case": name, "pred": folder / name, "ref": _reference(entry, plans), "metrics": m,
                     "mean_dice": float(np.nanmean(dice)) if not np.all(np.isnan(dice)) else float("nan")})
    return sorted(rows, key=lambda r: (np.nan_to_num(r["mean_dice"], nan=-1.0), r["case"]))


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _plans_rows(plans: dict, configuration: str | None) -> list[list[str]]:
    rows = [["encoder", html.escape(str(plans["encoder"]["name"])), ""]]
    configs = plans["configurations"]
    config = configs.get(configuration) or next(iter(configs.values()))
    for key, reason in config.items():
        if not key.endswith("_reason"):
            continue
        field = REASON_OF.get(key, key[: -len("_reason")])
        value = config.get(field, "")
        rows.append([html.escape(field), html.escape(str(value)), html.escape(str(reason))])
    for i, n in enumerate(config.get("normalization", [])):
        rows.append([f"normalization (channel {i})", html.escape(str(n.get("scheme", n.get("type", "")))),
                     html.escape(str(n.get("reason", "")))])
    return rows


def write_report(folder, output_folder=None, images_folder=None, num_overlays: int = 3) -> Path:
    """Write ``report.html`` (and ``report_files/``) for ``folder`` into ``output_folder`` (default: the evaluated
    folder itself). Returns the page's path."""
    src = find_sources(folder, images_folder)
    out = check_writable_folder(Path(output_folder) if output_folder else src["folder"], "the output folder (-o)")
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    summary, plans = src["summary"], src["plans"]
    rows = _case_rows(summary, src["folder"], plans)
    classes = list(summary["mean"])
    names = dict(zip(map(str, plans["label_values"]), plans["class_names"])) if plans else {}
    label = lambda c: html.escape(f"{names.get(c, 'class')} ({c})")  # noqa: E731
    parts = [f"<h1>samunet report</h1><p class=\"title\">{html.escape(src['title'])}</p>"]
    fg = summary["foreground_mean"]
    parts.append(f"<h2>Summary</h2><p>Mean foreground Dice <b>{_fmt(fg['Dice'])}</b>, HD95 {_fmt(fg['HD95'])} mm, "
                 f"{len(rows)} cases.</p>")
    per_class = [[label(c), _fmt(summary["mean"][c]["Dice"]),
                  _fmt(float(np.nanmedian([r["metrics"][c]["Dice"] for r in rows]))),
                  _fmt(float(np.nanmin([r["metrics"][c]["Dice"] for r in rows]))),
                  _fmt(summary["mean"][c]["HD95"]), _fmt(summary["mean"][c].get("NSD"))] for c in classes]
    parts.append("<h2>Per class</h2>" + _table(["class", "mean Dice", "median Dice", "worst Dice", "mean HD95 (mm)",
                                                "mean NSD"], per_class))
    num_overlays = min(num_overlays, max(1, len(rows) // 2))  # few cases: worst and best halves, not overlapping
    shown = _overlays(src, rows, files, num_overlays, plans)
    case_rows = [[f'<a href="report_files/{html.escape(shown[r["case"]])}">{html.escape(r["case"])}</a>'
                  if r["case"] in shown else html.escape(r["case"]), _fmt(r["mean_dice"])]
                 + [_fmt(r["metrics"][c]["Dice"]) for c in classes] + [_fmt(r["metrics"][c]["HD95"]) for c in classes]
                 for r in rows]
    header = ["case", "mean Dice"] + [f"Dice {names.get(c, c)}" for c in classes] \
        + [f"HD95 {names.get(c, c)} (mm)" for c in classes]
    parts.append("<h2>Per case, worst first</h2>" + _table(header, case_rows, "cases"))
    if shown:
        legend = legend_html(plans["label_values"], plans["class_names"]) if plans else ""
        for title, group in (("Worst cases", rows[:num_overlays]), ("Best cases", rows[::-1][:num_overlays])):
            figs = "".join(f'<figure><img src="report_files/{html.escape(shown[r["case"]])}" '
                           f'alt="{html.escape(r["case"])}"><figcaption>{html.escape(r["case"])}: mean Dice '
                           f'{_fmt(r["mean_dice"])}</figcaption></figure>'
                           for r in group if r["case"] in shown)
            parts.append(f"<h2>{title}</h2><p>Reference (left) and prediction (right), slice of largest reference "
                         f"foreground. {legend}</p><div class=\"figs\">{figs}</div>")
    if src["progress"] is not None:
        shutil.copyfile(src["progress"], files / "progress.png")
        parts.append('<h2>Training progress</h2><img class="progress" src="report_files/progress.png" '
                     'alt="training progress">')
    if plans:
        config = _configuration_of(src)
        parts.append(f"<h2>Plans ({html.escape(str(config or 'configuration'))}): choices and reasons</h2>"
                     + _table(["field", "value", "reason"], _plans_rows(plans, config), "plans"))
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>samunet report: {html.escape(src['title'])}"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    logger.info("report written to %s", path)
    return path


def _configuration_of(src: dict) -> str | None:
    for folder in (src["folder"].parent.parent, src["folder"]):
        parts = folder.name.split("__")
        if len(parts) == 3:
            return parts[2]
    args = src["folder"] / "predict_from_raw_data_args.json"
    return Path(load_json(args)["model_folder"]).name.split("__")[-1] if args.is_file() else None


def _overlays(src: dict, rows: list[dict], files: Path, n: int, plans) -> dict:
    """Overlay PNGs of the ``n`` worst and best cases -> {case file: png name}; none without images."""
    images, ending = src["images"], plans["file_ending"] if plans else None
    if images is None or ending is None or not images.is_dir():
        logger.warning("no overlays: the case images were not found (pass --images FOLDER)")
        return {}
    shown = {}
    for r in rows[:n] + rows[::-1][:n]:
        if r["case"] in shown:
            continue
        ident = r["case"][: -len(ending)]
        image = images / f"{ident}_0000{ending}"
        if not image.is_file():
            logger.warning("no overlay for %s: %s not found", ident, image)
            continue
        write_overlay(files / f"{ident}.png", image, r["ref"], r["pred"], plans["label_values"])
        shown[r["case"]] = f"{ident}.png"
    return shown


CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
table.plans td{text-align:left;vertical-align:top}figure{display:inline-block;margin:0 1em 1em 0}
figure img{height:260px}img.progress{max-width:100%}.title{color:#555}"""
