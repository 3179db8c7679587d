"""Checking a plans file before anything runs from it.

Plans are JSON that users read and edit by hand, as nnU-Net's. A value of the wrong type or out of range would
otherwise surface deep in preprocessing or training as a traceback (``int('abc')``, an index error, a reshape of the
wrong size); ``check_plans`` names the file, the key and what it expects instead:

    error: .../samunetPlans.json: configurations.2d.batch_size is 'abc', not an integer >= 1

Only the values that preprocessing, training and inference read are checked; reasons and other notes are free text.
Keys that older plans lack and the code defaults (``embedding_context``, ``early_stopping_patience``, ``tile_step``,
``augmented_views``) are checked where present.
"""
from __future__ import annotations

from numbers import Real
from pathlib import Path

from samunet.models.specs import ENCODER_SPECS, HEADS
from samunet.utils import SamunetError

NORMALIZATION_SCHEMES = ("ct_window", "percentile_clip", "natural_8bit")
CHANNEL_RULES = ("replicate", "neighbour_slices", "rgb", "encode_each_and_fuse")
INPLANE_MODES = ("resize", "sliding_window")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _positive_numbers(n: int):
    return (lambda v: isinstance(v, list) and len(v) == n and all(_is_number(x) and x > 0 for x in v),
            f"not a list of {n} positive numbers")


def _positive_ints(n: int):
    return (lambda v: isinstance(v, list) and len(v) == n and all(_is_int(x) and x > 0 for x in v),
            f"not a list of {n} positive integers")


def _int_at_least(low: int):
    return lambda v: _is_int(v) and v >= low, f"not an integer >= {low}"


def _one_of(choices):
    return lambda v: v in choices, f"not one of {', '.join(map(str, choices))}"


_PERMUTATION = (lambda v: isinstance(v, list) and sorted(v) == [0, 1, 2], "not a permutation of [0, 1, 2]")
_TEXT = (lambda v: isinstance(v, str) and bool(v), "not a non-empty string")

# key -> (required, test, what it should be)
CONFIG_RULES = {
    "data_identifier": (True, *_TEXT),
    "preprocessing_identity": (True, *_TEXT),
    "slice_axis": (True, *_one_of((0, 1, 2))),
    "transpose_forward": (True, *_PERMUTATION),
    "transpose_backward": (True, *_PERMUTATION),
    "spacing": (True, *_positive_numbers(3)),
    "target_spacing_inplane": (True, *_positive_numbers(2)),
    "slice_context": (True, *_one_of((1, 3))),
    "embedding_context": (False, *_one_of((1, 3))),
    "encoder_input_size": (True, *_int_at_least(16)),
    "inplane_mode": (True, *_one_of(INPLANE_MODES)),
    "patch_size": (True, *_positive_ints(2)),
    "tile_step": (False, lambda v: _is_number(v) and 0 < v <= 1, "not a number in (0, 1]"),
    "head": (True, *_one_of(HEADS)),
    "batch_size": (True, *_int_at_least(1)),
    "num_epochs": (True, *_int_at_least(1)),
    "iterations_per_epoch": (True, *_int_at_least(1)),
    "early_stopping_patience": (False, *_int_at_least(0)),
    "cache_embeddings": (False, lambda v: isinstance(v, bool), "not true or false"),
    "initial_lr": (True, lambda v: isinstance(v, dict) and all(_is_number(x) and x > 0 for x in v.values()),
                   "not an object of positive learning rates per head"),
}


def _check_configuration(name: str, config, plans: dict, fail) -> None:
    where = f"configurations.{name}"
    if not isinstance(config, dict):
        fail(f"{where} is not an object")
    for key, (required, test, expected) in CONFIG_RULES.items():
        if key not in config:
            if required:
                fail(f"{where}.{key} is missing")
            continue
        if not test(config[key]):
            fail(f"{where}.{key} is {config[key]!r}, {expected}")
    fwd, back = config["transpose_forward"], config["transpose_backward"]
    if [fwd[i] for i in back] != [0, 1, 2]:
        fail(f"{where}.transpose_backward {back} does not undo transpose_forward {fwd}")
    spec = ENCODER_SPECS.get(plans["encoder"]["name"])
    if spec is not None and not spec.valid_input_size(config["encoder_input_size"]):
        fail(f"{where}.encoder_input_size is {config['encoder_input_size']}, not valid for encoder {spec.name} "
             f"(a multiple of {spec.size_multiple}, at least {spec.min_input_size})")
    rule = config.get("channel_rule")
    if not isinstance(rule, dict) or rule.get("type") not in CHANNEL_RULES:
        fail(f"{where}.channel_rule is {rule!r}, not an object whose type is one of {', '.join(CHANNEL_RULES)}")
    _check_views_rule(f"{where}.augmented_views", config.get("augmented_views"), fail)
    norm = config.get("normalization")
    if not isinstance(norm, list) or len(norm) != len(plans["channel_names"]):
        fail(f"{where}.normalization is {norm!r}, not a list of one scheme per channel "
             f"({len(plans['channel_names'])})")
    for c, scheme in enumerate(norm):
        if not isinstance(scheme, dict) or scheme.get("scheme") not in NORMALIZATION_SCHEMES:
            fail(f"{where}.normalization[{c}] is {scheme!r}, not an object whose scheme is one of "
                 f"{', '.join(NORMALIZATION_SCHEMES)}")


def _check_views_rule(where: str, rule, fail) -> None:
    """The hybrid head's augmented-views rule (optional): seconds per encoder input (it divides the budget, so > 0),
    per head sample, the budget, and the cap on views (absent in plans made before it: the trainer's legacy cap)."""
    if rule is None:
        return
    if not isinstance(rule, dict):
        fail(f"{where} is {rule!r}, not an object")
    for key in ("encoder_s_per_input", "head_s_per_sample", "budget_s", "max_views"):
        if key == "max_views" and key not in rule:
            continue
        value, positive = rule.get(key), key == "encoder_s_per_input"
        if not _is_number(value) or value < 0 or (positive and value == 0):
            fail(f"{where}.{key} is {value!r}, not a number {'> 0' if positive else '>= 0'}; correct it or run "
                 "samunet_plan_and_preprocess again")


def check_plans(plans, source: str | Path) -> dict:
    """Return ``plans`` unchanged if the values samunet reads from it are usable, else raise ``SamunetError``
    naming ``source`` (the plans file), the key and what it should be."""
    def fail(problem: str):
        raise SamunetError(f"{source}: {problem}")

    if not isinstance(plans, dict):
        fail("is not a plans object")
    encoder = plans.get("encoder")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("name"), str):
        fail(f"encoder is {encoder!r}, not an object with an encoder name")
    labels = plans.get("label_values")
    if not isinstance(labels, list) or len(labels) < 2 or not all(_is_int(v) and v >= 0 for v in labels) \
            or len(set(labels)) != len(labels):
        fail(f"label_values is {labels!r}, not a list of at least two distinct integers >= 0")
    channels = plans.get("channel_names")
    if not isinstance(channels, (list, dict)) or not channels:
        fail(f"channel_names is {channels!r}, not a non-empty list")
    if not isinstance(plans.get("file_ending"), str):
        fail(f"file_ending is {plans.get('file_ending')!r}, not a string")
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or not configs:
        fail("configurations is missing or empty")
    for name, config in configs.items():
        _check_configuration(name, config, plans, fail)
    return plans
