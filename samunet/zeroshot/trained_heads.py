"""The trained heads a zero-shot run compares with SAM's prompted output: every trained fold of the data set and
configuration, each only on its own validation cases (the cases it never trained on).

    found, splits = trained_folds(dataset_name, plans, "2d")
    heads = load_trained_heads(dataset_name, plans, "2d", encoder, encoder_name, input_size, device)
"""
from __future__ import annotations

import logging

from samunet.paths import preprocessed_folder, results_folder
from samunet.planning.plans import get_configuration
from samunet.utils import SamunetError, load_json

logger = logging.getLogger("samunet")


def trained_folds(dataset_name: str, plans: dict, configuration: str) -> tuple[list, list]:
    """(model folder, fold folder) of every trained fold with checkpoint_final.pth, and the splits; nothing
    when there is no splits_final.json to say which cases each fold never trained on."""
    folder = results_folder() / dataset_name
    pattern = f"samunetTrainer_*__{plans['plans_name']}__{configuration}"
    found = [(d, f) for d in sorted(folder.glob(pattern)) for f in sorted(d.glob("fold_*"))
             if (f / "checkpoint_final.pth").is_file() and f.name != "fold_all"]
    splits_file = preprocessed_folder() / dataset_name / "splits_final.json"
    if found and not splits_file.is_file():
        logger.warning("trained models exist but %s does not; they are not compared", splits_file)
        return [], []
    return found, (load_json(splits_file) if found else [])


def load_trained_heads(dataset_name: str, plans: dict, configuration: str, encoder, encoder_name: str,
                       input_size: int, device) -> list[dict]:
    """Every trained fold (checkpoint_final.pth) of this data set and configuration, with its validation cases.
    ``encoder`` is reused when it is the plans' encoder at the plans' input size, else the plans' one is built.
    Checkpoints that do not fit the current plans are skipped with a warning."""
    from samunet.models.encoders import encoder_identity
    from samunet.models.for_plans import build_encoder_for_plans, model_from_state
    from samunet.models.run_checkpoint import check_compatible, load_checkpoint
    from samunet.models.specs import ENCODER_HEADS, IMAGE_MODELS
    found, splits = trained_folds(dataset_name, plans, configuration)
    if not found:
        return []
    config = get_configuration(plans, configuration)
    splits_file = preprocessed_folder() / dataset_name / "splits_final.json"
    if input_size != int(config["encoder_input_size"]) or encoder_name != plans["encoder"]["name"]:
        encoder = build_encoder_for_plans(plans, config, device)
    identity = encoder_identity(encoder)
    out = []
    for model_dir, fold_dir in found:
        fold = int(fold_dir.name[len("fold_"):])
        path = fold_dir / "checkpoint_final.pth"
        try:
            state = load_checkpoint(path)
            expected = {"configuration": configuration, "preprocessing_identity": config["preprocessing_identity"]}
            if state.get("head") not in IMAGE_MODELS:   # the U-Net has no encoder to match
                expected["encoder_identity"] = identity
            check_compatible(state, path, expected)
        except SamunetError as e:
            logger.warning("trained model skipped: %s", e)
            continue
        if fold >= len(splits):
            logger.warning("%s: fold %d is not in %s; skipped", model_dir.name, fold, splits_file)
            continue
        head = model_from_state(state, encoder)
        # heads on the slice's embedding alone reuse the suite's embedding; the others go through the predictor
        on_embedding = state["head"] in ENCODER_HEADS and int(state.get("embedding_context", 1)) == 1
        trainer = model_dir.name.split("__")[0]
        out.append({"name": f"{trainer.replace('samunetTrainer_', '')}_fold{fold}", "trainer": trainer,
                    "fold": fold, "head": head.to(device).eval(), "encoder": encoder, "on_embedding": on_embedding,
                    "val": set(splits[fold]["val"])})
    return out
