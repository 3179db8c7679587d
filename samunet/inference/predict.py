"""``samunet_predict``: predict a folder of cases with a fold ensemble, in the original geometry.

Each case is preprocessed exactly as in training, predicted slice by slice (the encoder runs once per slice and
mirroring view for all folds), and exported by inverting every preprocessing step. Outputs are written under a
temporary name and renamed, so a killed run never leaves a half-written file; ``continue_prediction`` skips cases
whose output exists. A case that cannot be predicted is reported by name and the others are still predicted.
"""
from __future__ import annotations

import logging
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from samunet.dataset.dataset_json import list_cases, stray_files
from samunet.dataset.io import write_seg
from samunet.inference.predictor import predict_preprocessed, probabilities_to_segmentation
from samunet.planning.plans import case_limits
from samunet.planning.plans_checks import check_plans
from samunet.preprocessing.preprocessor import preprocess_case
from samunet.models.run_checkpoint import check_compatible, load_checkpoint
from samunet.utils import SamunetError, atomic_write_bytes, check_writable_folder, load_json, save_json

logger = logging.getLogger("samunet")


def parse_model_folder(model_dir: Path) -> tuple[str, str, str]:
    parts = model_dir.name.split("__")
    if len(parts) != 3:
        raise SamunetError(f"{model_dir}: not a samunet model folder (expected TRAINER__PLANS__CONFIGURATION)")
    return parts[0], parts[1], parts[2]


def head_of(trainer: str) -> str:
    """``samunetTrainer_autosam_n5`` -> ``autosam``; ``samunetTrainer_unet_ssl_n5`` (fine-tuned from
    ``samunet_pretrain``) -> ``unet``; ``samunetTrainer_hybrid_st_n5`` (a self-training student) -> ``hybrid``."""
    head = trainer[len("samunetTrainer_"):] if trainer.startswith("samunetTrainer_") else trainer
    return re.sub(r"(_ssl|_st)?(_n\d+)?$", "", head)


def check_trainer_name(trainer: str, head: str | None = None, num_labeled_cases: int | None = None) -> str:
    """nnU-Net's ``-tr``: ``samunetTrainer_<head>[_ssl|_st][_n<N>]``; returns the head, refusing a name that stands
    for no head or disagrees with ``--head`` / ``--num_labeled_cases`` given beside it (``_ssl``: the U-Net
    fine-tuned from ``samunet_pretrain``; ``_st[_n<N>]``: a hybrid student of self-training)."""
    from samunet.models.specs import HEADS, HYBRID_HEADS, IMAGE_MODELS
    m = re.fullmatch(r"samunetTrainer_([a-z0-9]+)(_ssl|_st)?(?:_n(\d+))?", trainer)
    if not m or m.group(1) not in HEADS or (m.group(2) == "_ssl" and m.group(1) not in IMAGE_MODELS) or \
            (m.group(2) == "_st" and m.group(1) not in HYBRID_HEADS):
        raise SamunetError(f"-tr {trainer}: not a samunet trainer name (samunetTrainer_<head>[_n<N>], head one of "
                           f"{', '.join(HEADS)}; samunetTrainer_unet_ssl[_n<N>] for the pre-trained U-Net; "
                           "samunetTrainer_hybrid_st[_n<N>] for a student of self-training)")
    if head is not None and head != m.group(1):
        raise SamunetError(f"-tr {trainer} and --head {head} name different heads; give one of them")
    n = int(m.group(3)) if m.group(3) else None
    if num_labeled_cases is not None and num_labeled_cases != n:
        raise SamunetError(f"-tr {trainer} and --num_labeled_cases {num_labeled_cases} disagree; give one of them")
    return m.group(1)


def default_trainer(dataset_name: str, configuration: str, plans_name: str = "samunetPlans",
                    num_labeled_cases: int | None = None) -> str:
    """The trainer a command uses when neither ``-tr`` nor ``--head`` is given: that of the plans' head where it
    was trained, else that of the only trained head (logged); with several other heads trained, an error naming
    them."""
    from samunet.models.specs import HEADS
    from samunet.paths import model_folder, results_folder, trainer_name
    results_dir = results_folder() / dataset_name
    found = sorted(results_dir.glob(f"samunetTrainer_*__{plans_name}__{configuration}"))
    plans_file = next((f / "plans.json" for f in found if (f / "plans.json").is_file()), None)
    if plans_file is None:
        raise SamunetError(f"no trained model for {dataset_name} configuration {configuration} in {results_dir}")
    head = check_plans(load_json(plans_file), plans_file)["configurations"][configuration]["head"]
    trained = [h for h in HEADS
               if model_folder(dataset_name, trainer_name(h, num_labeled_cases), plans_name, configuration).is_dir()]
    if head not in trained and len(trained) == 1:
        logger.info("the plans' %s head was not trained; using the trained %s head", head, trained[0])
        head = trained[0]
    elif head not in trained and trained:
        raise SamunetError(f"the plans' {head} head has no trained model {trainer_name(head, num_labeled_cases)} "
                           f"for {dataset_name} configuration {configuration}; trained heads: {', '.join(trained)}; "
                           "choose one with --head")
    return trainer_name(head, num_labeled_cases)


class EnsemblePredictor:
    def __init__(self, model_dir: str | Path, folds=None, checkpoint: str = "checkpoint_final.pth",
                 device: str = "auto", tta: bool = True, tile_step_size: float | None = None):
        from samunet.models.encoders import encoder_identity
        from samunet.models.specs import IMAGE_MODELS
        from samunet.models.for_plans import build_encoder_for_plans, model_from_state, resolve_device
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise SamunetError(f"{self.model_dir}: model folder not found")
        self.trainer, _, self.configuration = parse_model_folder(self.model_dir)
        self.plans = check_plans(load_json(self.model_dir / "plans.json"), self.model_dir / "plans.json")
        self.dataset_json = load_json(self.model_dir / "dataset.json")
        if self.configuration not in self.plans.get("configurations", {}):
            raise SamunetError(f"{self.model_dir / 'plans.json'}: has no configuration '{self.configuration}'")
        self.config = self.plans["configurations"][self.configuration]
        if tile_step_size is not None:  # sliding-window overlap at prediction time, as nnU-Net's -step_size
            if not 0 < float(tile_step_size) <= 1:
                raise SamunetError(f"step size {tile_step_size}: must lie in (0, 1] (a fraction of the tile size)")
            self.config = {**self.config, "tile_step": float(tile_step_size)}
        self.dims, self.memory_gb = case_limits(self.model_dir, self.plans)  # dims: the data set's, when known
        self.label_values = self.plans["label_values"]
        self.device = resolve_device(device)
        self.checkpoint = checkpoint
        self.tta = self.tta_requested = tta
        available = sorted(p.name[len("fold_"):] for p in self.model_dir.glob("fold_*")
                           if (p / checkpoint).is_file())
        if folds is None:
            folds = available
            if not folds:
                raise SamunetError(f"{self.model_dir}: no fold_* folder with {checkpoint}; train first")
        self.folds = [str(f) for f in folds]
        for f in self.folds:
            if f not in available:
                raise SamunetError(f"{self.model_dir}: fold {f} has no {checkpoint} (available folds with it: "
                                   f"{', '.join(available) or 'none'})")
        states = {f: load_checkpoint(self.model_dir / f"fold_{f}" / checkpoint) for f in self.folds}
        # mirroring test-time augmentation only where every fold was trained with mirroring augmentation (as
        # nnU-Net allows only its training's mirror axes): heads trained on cached embeddings never saw mirrored
        # inputs, and averaging in mirrored views swaps orientation-dependent labels (Hippocampus anterior/posterior)
        unmirrored = [f for f, s in states.items()
                      if not s.get("mirroring_axes", [] if s.get("use_cache", True) else [0, 1])]
        if self.tta and unmirrored:
            logger.warning("mirroring test-time augmentation is not applied: fold(s) %s were trained on cached "
                           "embeddings without mirroring augmentation", ", ".join(unmirrored))
            self.tta = False
        # the from-scratch U-Net reads images: no encoder is built when every fold is one
        needs_encoder = any(s.get("head") not in IMAGE_MODELS for s in states.values())
        self.encoder = build_encoder_for_plans(self.plans, self.config, self.device) if needs_encoder else None
        identity = encoder_identity(self.encoder) if needs_encoder else None
        self.heads = []
        for f, state in states.items():
            path = self.model_dir / f"fold_{f}" / checkpoint
            is_image_model = state.get("head") in IMAGE_MODELS
            # the same identity training's --c checks, with the head and trainer the folder's name stands for
            check_compatible(state, path, {"dataset_name": self.plans["dataset_name"],
                                           "configuration": self.configuration, "head": head_of(self.trainer),
                                           "trainer": self.trainer, "fold": f,
                                           "encoder_identity": None if is_image_model else identity,
                                           "preprocessing_identity": self.config["preprocessing_identity"]})
            head = model_from_state(state, self.encoder)
            self.heads.append(head.to(self.device).eval())

    def predict_case(self, image_files, output_file: Path, save_probabilities: bool = False) -> None:
        data, props = self.preprocess(image_files)
        self.export(self.predict_preprocessed_case(data), props, Path(output_file), save_probabilities)

    def preprocess(self, image_files) -> tuple[np.ndarray, dict]:
        data, _, props = preprocess_case(image_files, None, self.config, self.label_values, self.dims,
                                         self.memory_gb)
        return data, props

    def predict_preprocessed_case(self, data: np.ndarray) -> np.ndarray:
        """Preprocessed ``(C, S, Y, X)`` -> averaged class probabilities ``(K, S, Y, X)``."""
        return predict_preprocessed(data, self.config, self.encoder, self.heads, len(self.label_values),
                                    tta=self.tta, batch_size=int(self.config["batch_size"]), device=self.device)

    def export(self, probs_pp: np.ndarray, props: dict, output_file: Path, save_probabilities: bool = False) -> None:
        """Probabilities in preprocessed space -> label file (and ``.npz``) in the original geometry."""
        seg, probs = probabilities_to_segmentation(probs_pp, props, self.label_values)
        if save_probabilities:
            import io
            buf = io.BytesIO()
            np.savez_compressed(buf, probabilities=probs.astype(np.float16))
            atomic_write_bytes(output_file.with_name(output_file.name[: -len(self.plans["file_ending"])] + ".npz"),
                               buf.getvalue())
        write_seg(seg, props["original"], output_file)


def check_folders(input_folder, output_folder) -> tuple[Path, Path]:
    """Refuse a missing input folder or an output folder that cannot be written, before any model is loaded."""
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if not input_folder.is_dir():
        raise SamunetError(f"{input_folder}: input folder not found")
    check_writable_folder(output_folder, "the output folder (-o)")
    return input_folder, output_folder


def predict_folder(input_folder, output_folder, model_dir, folds=None, checkpoint="checkpoint_final.pth",
                   tta: bool = True, save_probabilities: bool = False, continue_prediction: bool = False,
                   device: str = "auto", tile_step_size: float | None = None, num_processes_preprocessing: int = 1,
                   num_processes_export: int = 1, progress: bool = True) -> dict:
    check_folders(input_folder, output_folder)
    predictor = EnsemblePredictor(model_dir, folds, checkpoint, device, tta, tile_step_size)
    return predict_cases(predictor, input_folder, output_folder, save_probabilities, continue_prediction,
                         num_processes_preprocessing, num_processes_export, progress)


def predict_cases(predictor: EnsemblePredictor, input_folder, output_folder, save_probabilities: bool = False,
                  continue_prediction: bool = False, num_processes_preprocessing: int = 1,
                  num_processes_export: int = 1, progress: bool = True, num_parts: int = 1, part_id: int = 0) -> dict:
    """Predict every case of ``input_folder`` into ``output_folder``. Reading and preprocessing run ahead in
    ``num_processes_preprocessing`` worker threads and export in ``num_processes_export`` threads, while the
    models predict in this one; the outputs do not depend on the numbers of workers. With ``num_parts``, only the
    sorted cases ``part_id``, ``part_id + num_parts``, ...: parts running anywhere predict each case once."""
    input_folder, output_folder = check_folders(input_folder, output_folder)
    npp, nps = int(num_processes_preprocessing), int(num_processes_export)
    if npp < 1 or nps < 1:
        raise SamunetError(f"-npp {npp} / -nps {nps}: the numbers of workers must be at least 1")
    ending = predictor.plans["file_ending"]
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SamunetError(f"-num_parts {num_parts} -part_id {part_id}: part_id must lie in 0..num_parts-1")
    cases = list_cases(input_folder, ending)
    stray = stray_files(input_folder, ending) if part_id == 0 else []  # reported once, by part 0
    if not cases:
        raise SamunetError(f"{input_folder}: no cases named CASE_XXXX{ending}"
                           + (f" (found {', '.join(p.name for p in stray[:3])}: wrong file ending?)" if stray else ""))
    output_folder.mkdir(parents=True, exist_ok=True)
    save_json(predictor.plans, output_folder / "plans.json")
    save_json(predictor.dataset_json, output_folder / "dataset.json")
    save_json({"input_folder": str(input_folder), "model_folder": str(predictor.model_dir), "folds": predictor.folds,
               "checkpoint": predictor.checkpoint, "tta": predictor.tta_requested, "tta_applied": predictor.tta,
               "tile_step_size": predictor.config.get("tile_step"), "save_probabilities": save_probabilities,
               "device": str(predictor.device)}, output_folder / "predict_from_raw_data_args.json")
    cases = cases[part_id::num_parts]
    n_channels = len(predictor.plans["channel_names"])
    failed, done, skipped, todo = {}, [], [], []
    for p in stray:
        failed[p.name] = f"{p}: does not match CASE_XXXX{ending} (wrong file ending or name); not predicted"

    def fail(case, e: SamunetError) -> None:
        msg = str(e)
        if "plans expect" in msg and "channel" in msg:
            msg += f" (the model was trained on {n_channels} channel(s): {', '.join(predictor.plans['channel_names'])})"
        failed[case.identifier] = f"case {case.identifier}: {msg}"
        logger.error("case %s failed: %s", case.identifier, msg)

    for case in cases:
        if continue_prediction and (output_folder / f"{case.identifier}{ending}").is_file():
            skipped.append(case.identifier)
        elif case.channel_indices != list(range(len(case.image_files))):
            fail(case, SamunetError(f"channel files {case.channel_indices} are not numbered 0..N-1"))
        else:
            todo.append(case)
    with ThreadPoolExecutor(npp) as pre, ThreadPoolExecutor(nps) as post:
        queue, exports = deque(), deque()
        ahead = iter(todo)

        def read_ahead() -> None:
            case = next(ahead, None)
            if case is not None:
                queue.append((case, pre.submit(predictor.preprocess, case.image_files)))

        def finish_export() -> None:
            case, future = exports.popleft()
            try:
                future.result()
                done.append(case.identifier)
            except SamunetError as e:
                fail(case, e)

        for _ in range(npp):
            read_ahead()
        for _ in tqdm(range(len(todo)), desc="predict", disable=not progress):
            case, future = queue.popleft()
            read_ahead()
            try:
                data, props = future.result()
                probs = predictor.predict_preprocessed_case(data)
            except SamunetError as e:
                fail(case, e)
                continue
            del data
            exports.append((case, post.submit(predictor.export, probs, props, output_folder / f"{case.identifier}"
                                              f"{ending}", save_probabilities)))
            while len(exports) > nps:  # bounded: at most nps cases' probabilities wait for export
                finish_export()
        while exports:
            finish_export()
    if skipped:
        logger.info("%d case(s) already predicted were skipped (--continue_prediction)", len(skipped))
    if failed:
        raise SamunetError(f"{len(failed)} case(s) could not be predicted (the other {len(done)} were written to "
                           f"{output_folder}):\n  - " + "\n  - ".join(failed.values()))
    return {"predicted": done, "skipped": skipped}
