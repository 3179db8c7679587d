"""``samunet_export_model_to_zip``: trained models of a data set in one zip file, to share them.

The zip holds, per model folder ``DatasetXXX/TRAINER__PLANS__CONFIGURATION/``: ``plans.json``, ``dataset.json``,
the fingerprint's parts prediction needs (no per-case lists), and per fold the chosen checkpoints (heads only),
``debug.json``, ``progress.png`` and ``validation/summary.json``. ``samunet_model.json`` at the root names the
models and the frozen encoder each needs (name, input size, SHA-256 of the weights); the encoder itself is never
included, so the receiver must have the same weights (``samunet_install_pretrained_model_from_zip`` checks).
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from samunet.inference.predict import check_trainer_name, parse_model_folder
from samunet.paths import resolve_dataset_name, results_folder
from samunet.models.run_checkpoint import load_checkpoint
from samunet.utils import SamunetError, atomic_file, load_json, stable_hash

logger = logging.getLogger("samunet")

MANIFEST = "samunet_model.json"
FORMAT = "samunet-model-zip-1"
# the fingerprint's data set-level facts; per-case lists (case names, spacings, shapes) stay at home
FINGERPRINT_KEYS = ("samunet_version", "dataset_name", "num_channels", "channel_names", "file_ending", "io", "dims",
                    "image_dtypes", "foreground_intensity_properties_per_channel", "class_properties")
FOLD_EXTRAS = ("debug.json", "progress.png", "validation/summary.json")


def encoder_of(state: dict, plans: dict) -> dict | None:
    """The frozen encoder a checkpoint's head reads (None for models that read images only)."""
    identity = state.get("encoder_identity")
    if identity is None:
        return None
    checkpoint = plans["encoder"].get("checkpoint")
    return {"name": identity["encoder"], "input_size": identity["input_size"],
            "weights_sha256": identity["weights_sha256"],
            "checkpoint_file": Path(checkpoint).name if checkpoint else None}


def select_model_folders(dataset_name: str, configurations=None, trainers=None, plans_name: str = "samunetPlans"):
    base = results_folder() / dataset_name
    if not base.is_dir():
        raise SamunetError(f"{base}: no trained models for {dataset_name}")
    found = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and p.name.count("__") == 2):
        trainer, plans, config = parse_model_folder(folder)
        if plans == plans_name and (not configurations or config in configurations) \
                and (not trainers or trainer in trainers):
            found.append(folder)
    if not found:
        raise SamunetError(f"{base}: no model folder TRAINER__{plans_name}__CONFIGURATION matches (configurations "
                           f"{configurations or 'any'}, trainers {trainers or 'any'})")
    return found


def export_model_to_zip(dataset, output_file, configurations=None, trainers=None, heads=None,
                        plans_name: str = "samunetPlans", folds=None, checkpoints=("checkpoint_final.pth",),
                        strict: bool = True) -> dict:
    """Write the selected models to ``output_file`` (atomically). ``heads`` are turned into trainer names
    (``autosam`` -> ``samunetTrainer_autosam``); ``strict``: a requested fold or checkpoint that is missing is an
    error, else it is skipped. Returns the manifest."""
    name = resolve_dataset_name(dataset)
    output_file = Path(output_file)
    if not output_file.name.endswith(".zip"):
        raise SamunetError(f"{output_file}: the output file must end with .zip")
    trainers = list(trainers or []) + [f"samunetTrainer_{h}" for h in heads or []]
    for t in trainers:
        check_trainer_name(t)
    entries, models = {}, []
    for folder in select_model_folders(name, configurations, trainers, plans_name):
        trainer, _, config = parse_model_folder(folder)
        plans = load_json(folder / "plans.json")
        prefix = f"{name}/{folder.name}"
        entries[f"{prefix}/plans.json"] = folder / "plans.json"
        entries[f"{prefix}/dataset.json"] = folder / "dataset.json"
        fingerprint = load_json(folder / "dataset_fingerprint.json")
        entries[f"{prefix}/dataset_fingerprint.json"] = {k: fingerprint[k] for k in FINGERPRINT_KEYS
                                                         if k in fingerprint}
        available = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if p.is_dir())
        wanted = [str(f) for f in folds] if folds else available
        model = {"folder": prefix, "trainer": trainer, "configuration": config, "folds": [], "encoder": None}
        for fold in wanted:
            fdir = folder / f"fold_{fold}"
            present = [c for c in checkpoints if (fdir / c).is_file()]
            if len(present) < len(checkpoints):
                missing = f"{fdir}: {', '.join(c for c in checkpoints if c not in present)} not found"
                if strict:
                    raise SamunetError(f"{missing} (pass --not_strict to export what exists)")
                logger.warning("%s; skipped", missing)
            for c in present:
                state = load_checkpoint(fdir / c)
                enc = encoder_of(state, plans)
                if model["encoder"] is not None and enc != model["encoder"]:
                    raise SamunetError(f"{fdir / c}: trained on another encoder than the folder's other folds")
                model["encoder"] = enc
                entries[f"{prefix}/fold_{fold}/{c}"] = fdir / c
            for extra in FOLD_EXTRAS:
                if present and (fdir / extra).is_file():
                    entries[f"{prefix}/fold_{fold}/{extra}"] = fdir / extra
            if present:
                model["folds"].append(fold)
        if model["folds"]:
            models.append(model)
    if not models:
        raise SamunetError(f"nothing to export for {name}: no selected fold has {', '.join(checkpoints)}")
    manifest = {"format": FORMAT, "dataset_name": name, "checkpoints": list(checkpoints), "models": models}
    manifest["id"] = stable_hash(manifest)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output_file) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(MANIFEST, json.dumps(manifest, indent=2))
        for arcname, src in entries.items():
            if isinstance(src, dict):
                z.writestr(arcname, json.dumps(src, indent=2))
            else:
                z.write(src, arcname)
    logger.info("exported %d model folder(s), %d file(s) to %s", len(models), len(entries), output_file)
    return manifest
