"""``samunet_move_plans_between_datasets``: use one data set's plans for another, as nnU-Net's command does.

The target gets the source's configurations unchanged (slice axis, spacing, encoder and input size, normalisation
with the source's intensity statistics, head, batch size), so models trained on the two share their preprocessing
and can be fine-tuned or compared. What describes the target itself is taken from the target: its name, labels,
channel names and file ending. The plans are written as ``<target_plans>.json`` in the target's preprocessed
folder; an existing plans file is only replaced with ``overwrite``.
"""
from __future__ import annotations

import copy

from samunet.dataset.dataset_json import load_dataset_json
from samunet.paths import raw_folder, resolve_dataset_name
from samunet.planning.plans import load_plans, plans_file
from samunet.planning.planner import PLANS_NAME
from samunet.utils import SamunetError, load_json, save_json


def move_plans_between_datasets(source, target, source_plans: str = PLANS_NAME, target_plans: str = PLANS_NAME,
                                overwrite: bool = False) -> dict:
    src, tgt = resolve_dataset_name(source), resolve_dataset_name(target)
    for p in (source_plans, target_plans):
        if not p or not p.replace("_", "").replace("-", "").isalnum():
            raise SamunetError(f"plans name '{p}': letters, digits, '_' and '-' only")
    plans = load_plans(src, source_plans)
    info = load_dataset_json(raw_folder() / tgt)
    if info.num_channels != len(plans["channel_names"]):
        raise SamunetError(f"{raw_folder() / tgt / 'dataset.json'}: {info.num_channels} channel(s), but the plans of "
                           f"{src} are for {len(plans['channel_names'])}; plans cannot be moved between them")
    fingerprint = plans_file(tgt, target_plans).parent / "dataset_fingerprint.json"
    source_dims = load_json(plans_file(src, source_plans).parent / "dataset_fingerprint.json").get("dims")
    if fingerprint.is_file() and load_json(fingerprint).get("dims") != source_dims:
        raise SamunetError(f"{fingerprint}: {tgt} has {load_json(fingerprint).get('dims')}D cases, the plans of {src} "
                           f"were made for {source_dims}D cases")
    out = plans_file(tgt, target_plans)
    if out.is_file() and not overwrite:
        raise SamunetError(f"{out}: exists; pass --overwrite to replace it, or choose another -tp name")
    moved = copy.deepcopy(plans)
    moved.update(dataset_name=tgt, plans_name=target_plans, channel_names=info.channel_names,
                 label_values=info.label_values, class_names=info.class_names, file_ending=info.file_ending,
                 moved_from={"dataset": src, "plans": source_plans})
    for name, config in moved["configurations"].items():
        ident = config["data_identifier"]
        config["data_identifier"] = target_plans + ident[len(source_plans):] if ident.startswith(source_plans) \
            else f"{target_plans}_{name}"
    save_json(moved, out)
    return moved
