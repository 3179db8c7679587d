"""``samunet_plot_overlay_pngs`` and ``samunet_report``."""
from __future__ import annotations

import argparse

from samunet.cli import _entry, _setup_logging


def overlay_pngs(output_folder, dataset=None, prediction_folder=None, images_folder=None, reference_folder=None,
                 num_processes: int = 2, channel: int = 0, alpha: float = 0.45) -> list:
    """Overlays of a raw data set (``dataset``: imagesTr with labelsTr) or of a prediction folder (a fold's
    validation or samunet_predict's output: its images and, where known or given, references found by itself)."""
    from samunet.dataset.dataset_json import load_dataset_json
    from samunet.paths import raw_folder, resolve_dataset_name
    from samunet.reports.html_report import find_sources
    from samunet.reports.overlays import plot_overlay_pngs
    from samunet.utils import SamunetError
    if (dataset is None) == (prediction_folder is None):
        raise SamunetError("give either -d (a raw data set) or -i (a prediction folder)")
    if dataset is not None:
        folder = raw_folder() / resolve_dataset_name(dataset)
        info = load_dataset_json(folder)
        return plot_overlay_pngs(output_folder, images_folder or folder / "imagesTr", info.file_ending,
                                 info.label_values, reference_folder or folder / "labelsTr", None, num_processes,
                                 channel, alpha)
    src = find_sources(prediction_folder, images_folder, need_summary=False)
    if src["plans"] is None or src["images"] is None:
        raise SamunetError(f"{prediction_folder}: neither a fold's validation nor a samunet_predict output folder; "
                           "pass --images (and --reference)")
    return plot_overlay_pngs(output_folder, src["images"], src["plans"]["file_ending"], src["plans"]["label_values"],
                             reference_folder or src["references"], src["folder"], num_processes, channel, alpha)


@_entry
def plot_overlay_pngs_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_plot_overlay_pngs",
                                description="One PNG per case: the image with its reference and/or predicted labels "
                                            "on the slice of largest foreground (reference left, prediction right).")
    p.add_argument("-d", default=None, help="a raw data set (id or name): imagesTr with labelsTr, as nnU-Net's")
    p.add_argument("-i", default=None, help="a prediction folder: a fold folder or its validation, or "
                                            "samunet_predict's output (its images and references are found)")
    p.add_argument("-o", required=True, help="output folder for CASE.png")
    p.add_argument("--images", default=None, help="images folder (CASE_0000.ext), if not found by itself")
    p.add_argument("--reference", default=None, help="reference labels folder, if not found by itself")
    p.add_argument("-np", type=int, default=2, help="worker threads (default 2)")
    p.add_argument("-channel_idx", type=int, default=0, help="image channel to show (default 0)")
    p.add_argument("-overlay_intensity", type=float, default=0.45, help="opacity of the labels (default 0.45)")
    a = p.parse_args(argv)
    _setup_logging()
    done = overlay_pngs(a.o, a.d, a.i, a.images, a.reference, a.np, a.channel_idx, a.overlay_intensity)
    print(f"{len(done)} overlay(s) written to {a.o}")


@_entry
def report_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_report",
                                description="HTML report of a fold's validation or an evaluated prediction folder: "
                                            "per-class and per-case Dice / HD95 (worst first), overlays of the worst "
                                            "and best cases, the training progress plot, the plans' choices and "
                                            "their reasons.")
    p.add_argument("folder", help="a fold folder (fold_K), its validation folder, or an evaluated prediction folder")
    p.add_argument("-o", default=None, help="output folder (default: the evaluated folder)")
    p.add_argument("--images", default=None, help="images folder (CASE_0000.ext), if not found by itself")
    p.add_argument("--num_overlays", type=int, default=3, help="worst and best cases to show (default 3 each)")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.reports.html_report import write_report
    print(f"report written to {write_report(a.folder, a.o, a.images, a.num_overlays)}")
