"""``samunet_accumulate_crossval_results`` and ``samunet_move_plans_between_datasets``, as in nnU-Net v2."""
from __future__ import annotations

import argparse

from samunet.cli import _entry, _setup_logging
from samunet.models.specs import HEADS


@_entry
def accumulate_crossval_results_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_accumulate_crossval_results",
                                description="Gather the folds' validation predictions of one model into "
                                            "crossval_results_folds_<folds>/ and evaluate them together.")
    p.add_argument("-d", required=True, help="data set id or name")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-tr", default=None, help="trainer name, e.g. samunetTrainer_autosam (default: the plans' head, "
                                             "or the only trained head)")
    p.add_argument("--head", default=None, choices=HEADS, help="the same as -tr samunetTrainer_<head>")
    p.add_argument("-p", default="samunetPlans", help="plans name (default samunetPlans)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-o", default=None, help="output folder (default: crossval_results_folds_<folds> in the model "
                                            "folder)")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.evaluation.crossval import accumulate_crossval_results
    from samunet.inference.predict import check_trainer_name
    trainer = a.tr
    if a.head is not None:
        trainer = trainer or f"samunetTrainer_{a.head}"
        check_trainer_name(trainer, a.head)
    s = accumulate_crossval_results(a.d, a.c, trainer, a.p, a.f, a.o)
    print(f"cross-validation foreground Dice (folds {' '.join(a.f)}): {s['foreground_mean']['Dice']:.4f}")


@_entry
def move_plans_between_datasets_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_move_plans_between_datasets",
                                description="Give the target data set the source's plans (same preprocessing, "
                                            "encoder and head settings), with the target's own labels, channels and "
                                            "file ending. Then: samunet_preprocess -d TARGET -plans_name TP and "
                                            "samunet_train TARGET CONFIG FOLD -p TP.")
    p.add_argument("-s", required=True, help="source data set id or name")
    p.add_argument("-t", required=True, help="target data set id or name (its raw dataset.json is read)")
    p.add_argument("-sp", default="samunetPlans", help="source plans name (default samunetPlans)")
    p.add_argument("-tp", default="samunetPlans", help="target plans name (default samunetPlans)")
    p.add_argument("--overwrite", action="store_true", help="replace the target's plans file if it exists "
                                                            "(nnU-Net replaces it silently; samunet asks for this)")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.planning.move_plans import move_plans_between_datasets
    from samunet.planning.plans import plans_file
    plans = move_plans_between_datasets(a.s, a.t, a.sp, a.tp, a.overwrite)
    print(f"plans written to {plans_file(plans['dataset_name'], a.tp)}")
