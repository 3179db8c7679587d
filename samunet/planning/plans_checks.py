"""Checking a plans file before anything runs from it.

Plans are JSON that users read and edit by hand, as nnU-Net's. A value of the wrong type or out of range would
otherwise surface deep in preprocessing or training as a traceback (``int('abc')``, an index error, a reshape of the
wrong size); ``check_plans`` names the file, the key and what it expects instead:

    error: .../samunetPlans.json: configurations.2d.batch_size is 'abc', not an integer >= 1

Only the values that preprocessing, training and inference read are checked; reasons and other notes are free text.
Keys that older plans lack and the code defaults (``embedding_context``, ``early_stopping_patience``, ``tile_step``,
``augmented_views``, the ``unet`` and ``hybrid`` network blocks, ...) are checked where present. A key samunet does not
read (a misspelt ``batchsize``) would silently change nothing, so it is named in a warning, with the key it resembles.
"""
from __future__ import annotations

import difflib
import logging
from numbers import Real
from pathlib import Path

from samunet.models.specs import ENCODER_SPECS, HEADS
from samunet.utils import SamunetError

logger = logging.getLogger("samunet")
_WARNED: set = set()

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
    "cpu_num_epochs": (False, lambda v: isinstance(v, dict) and all(_is_int(x) and x >= 1 for x in v.values()),
                       "not an object of epochs (integers >= 1) per head"),
    "cooldown_epochs": (False, *_int_at_least(0)),
    "median_slice_shape": (False, *_positive_numbers(2)),
}
# keys the planner writes that are read by people, not code (reasons, estimates), or checked below by hand
INFORMATIVE_CONFIG_KEYS = {"channel_rule", "normalization", "augmented_views", "unet", "hybrid", "embedding_cache",
                           "estimated_cache_gb", "training_slices", "encoder_inputs", "estimated_encoder_cpu_hours"}
PLANS_KEYS = {"dataset_name", "plans_name", "samunet_version", "seed", "encoder", "channel_names", "label_values",
              "class_names", "file_ending", "original_median_spacing", "original_median_shape",
              "foreground_intensity_properties_per_channel", "budgets", "configurations"}


def _check_configuration(name: str, config, plans: dict, fail, warn) -> None:
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
    for block in ("unet", "hybrid"):
        if block in config:
            _check_network_block(f"{where}.{block}", config[block], fail, warn)
    _warn_unknown(where, config, set(CONFIG_RULES) | INFORMATIVE_CONFIG_KEYS, warn)
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


def _pairs(n: int, odd: bool = False):
    return lambda v: isinstance(v, list) and len(v) == n and all(
        isinstance(p, list) and len(p) == 2 and all(_is_int(x) and x >= 1 and (x % 2 == 1 or not odd) for x in p)
        for p in v)


def _check_network_block(where: str, block, fail, warn) -> None:
    """A U-Net topology block (``unet``, ``hybrid``): per-stage lists of the length ``n_stages`` says, and feature map
    sizes that are the canvas divided by the strides so far (the hybrid head resamples the embedding to them)."""
    if not isinstance(block, dict):
        fail(f"{where} is {block!r}, not an object")
    n = block.get("n_stages")
    if not _is_int(n) or n < 1:
        fail(f"{where}.n_stages is {n!r}, not an integer >= 1")
    rules = {
        "features_per_stage": _positive_ints(n),
        "strides": (_pairs(n), f"not a list of {n} [y, x] pairs of integers >= 1"),
        "kernel_sizes": (_pairs(n, odd=True), f"not a list of {n} [y, x] pairs of odd integers >= 1"),
        "n_conv_per_stage": _positive_ints(n),
        "n_conv_per_stage_decoder": _positive_ints(n - 1),  # one per decoder stage
        "feature_map_sizes": (_pairs(n), f"not a list of {n} [y, x] pairs of integers >= 1"),
        "canvas_size": _int_at_least(16),
        "deep_supervision": (lambda v: isinstance(v, bool), "not true or false"),
    }
    for key, (test, expected) in rules.items():
        if key in block and not test(block[key]):
            fail(f"{where}.{key} is {block[key]!r}, {expected}")
        if key not in block and key not in ("feature_map_sizes", "canvas_size", "deep_supervision"):
            fail(f"{where}.{key} is missing")
    if "canvas_size" in block and "feature_map_sizes" in block:
        side = [block["canvas_size"]] * 2
        for stage, (stride, size) in enumerate(zip(block["strides"], block["feature_map_sizes"])):
            side = [s // k if s % k == 0 else None for s, k in zip(side, stride)]
            if side != size:
                fail(f"{where}.feature_map_sizes[{stage}] is {size}, but a {block['canvas_size']} px canvas through "
                     f"strides {block['strides'][:stage + 1]} gives {side}; correct it or run "
                     "samunet_plan_and_preprocess again")
    _warn_unknown(where, block, set(rules) | {"n_stages"}, warn)


def _warn_unknown(where: str, obj: dict, known: set, warn) -> None:
    for key in obj:
        if key in known or key.endswith(("_reason", "_note")):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        warn(f"{where + '.' if where else ''}{key} is not a key samunet reads; it changes nothing"
             + (f" (did you mean {close[0]}?)" if close else ""))


def check_plans(plans, source: str | Path) -> dict:
    """Return ``plans`` unchanged if the values samunet reads from it are usable, else raise ``SamunetError``
    naming ``source`` (the plans file), the key and what it should be."""
    def fail(problem: str):
        raise SamunetError(f"{source}: {problem}")

    def warn(problem: str):
        if (str(source), problem) not in _WARNED:  # a run loads its plans more than once: say it once
            _WARNED.add((str(source), problem))
            logger.warning("%s: %s", source, problem)

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
        _check_configuration(name, config, plans, fail, warn)
    _warn_unknown("", plans, PLANS_KEYS, warn)
    return plans
