"""Command-line entry points for evaluation, mirroring nnUNetv2_evaluate_folder and nnUNetv2_evaluate_simple."""
from __future__ import annotations

import argparse

from samunet.cli import _entry, _setup_logging
from samunet.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("gt_folder", help="folder with the reference label maps")
    p.add_argument("pred_folder", help="folder with the predicted label maps (same file names)")
    p.add_argument("-o", default=None, metavar="FILE",
                   help="output file (default: PRED_FOLDER/summary.json)")
    p.add_argument("-np", type=int, default=2, help="number of worker processes (default 2)")
    p.add_argument("--chill", action="store_true",
                   help="do not fail when predictions are missing for some reference files; evaluate the rest")
    p.add_argument("--nsd_tolerance", type=float, default=DEFAULT_NSD_TOLERANCE_MM, metavar="MM",
                   help=f"tolerance of the normalised surface distance in mm (default {DEFAULT_NSD_TOLERANCE_MM:g})")


@_entry
def evaluate_folder_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_evaluate_folder",
                                description="Evaluate predictions against references with the labels and file "
                                            "ending of a dataset.json, as nnUNetv2_evaluate_folder does.")
    _add_common(p)
    p.add_argument("-djfile", required=True, help="dataset.json (foreground labels and file_ending)")
    p.add_argument("-pfile", default=None,
                   help="samunetPlans.json (optional; accepted as in nnU-Net, supplies file_ending when the "
                        "dataset.json has none)")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.evaluation.evaluate import evaluate_folder_from_dataset_json
    evaluate_folder_from_dataset_json(a.gt_folder, a.pred_folder, a.djfile, a.pfile, a.o, a.np, a.chill,
                                      a.nsd_tolerance)


@_entry
def evaluate_simple_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_evaluate_simple",
                                description="Evaluate predictions against references for the given label values, "
                                            "as nnUNetv2_evaluate_simple does (file ending taken from GT_FOLDER).")
    _add_common(p)
    p.add_argument("-l", type=int, nargs="+", required=True, metavar="LABEL", help="label values to evaluate")
    p.add_argument("-il", type=int, default=None, metavar="LABEL",
                   help="ignore label: reference voxels with this value are left out of every metric")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.evaluation.evaluate import evaluate_simple
    evaluate_simple(a.gt_folder, a.pred_folder, a.l, a.o, a.np, a.chill, a.il, a.nsd_tolerance)
