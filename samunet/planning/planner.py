"""The experiment planner: from a fingerprint to ``samunetPlans.json``.

Every choice that has alternatives is recorded next to the reason it was made, so a user can read the plans
file and see why samunet configured itself as it did. The planner is deterministic: the same fingerprint and
options always give the same plans.
"""
from __future__ import annotations

import math

import numpy as np

from samunet import __version__
from samunet.models.specs import HEADS, EncoderSpec, get_encoder_spec, uncached_head
from samunet.models.hybrid import hybrid_block
from samunet.models.unet import canvas_block
from samunet.utils import SamunetError, stable_hash

PLANS_NAME = "samunetPlans"
PREPROCESSING_VERSION = 1
MIN_STRUCTURE_WIDTH_PX = 2.0      # thinnest structure width that resizing into the encoder may leave
TILE_STEP = 0.5                   # sliding-window step as a fraction of the tile
MAX_BATCH_SIZE = 32
MIN_BATCH_SIZE = 2
CPU_GFLOPS_REFERENCE = 55.0       # LiteMedSAM fp32 eager, measured on a 2-core CPU: 75 GFLOP in ~1.35 s
MIN_ITERATIONS, MAX_ITERATIONS = 25, 250
NUM_EPOCHS_CACHED, NUM_EPOCHS_ON_THE_FLY = 100, 50
EARLY_STOPPING_PATIENCE = 15
CPU_HOURS_PER_FOLD = 3.0          # the epoch cap on a CPU keeps one fold within a few hours
# seconds per training sample on 2 CPU cores (fp32, forward and backward), measured at the size given, and scaled
# by pixels to other sizes: heads at the encoder input P, the U-Net and the hybrid head at their canvas Q
# (autosam: 0.075 s before the folded two-way attention made its step 2.14x faster at 16 x 128 px, head_step.md)
CPU_SECONDS_PER_SAMPLE = {"autosam": (0.035, 128), "cnn": (0.05, 128), "linear": (0.005, 128),
                          "unet": (0.019, 64), "hybrid": (0.03, 64)}  # the U-Net: 0.63x the hybrid head, same run
INITIAL_LR = {"autosam": 1e-3, "cnn": 1e-3, "linear": 1e-2,  # a lone 1x1 classifier needs larger steps
              "unet": 1e-2,  # the from-scratch U-Net: nnU-Net's SGD learning rate
              "hybrid": 1e-2}  # the hybrid head is mostly a U-Net: nnU-Net's SGD learning rate
RGB_NAMES = ({"r", "g", "b"}, {"red", "green", "blue"})
# augmented views for the hybrid head: encoder seconds (at the CPU reference) one run may spend on them, i.e. 4000
# LiteMedSAM encodings at 128 px (64 views of one Hippocampus case, 22 of 5, 5 of 20)
VIEW_BUDGET_S = 1360.0
# and at most this many views per labelled input: 64 views of one Hippocampus case reached 0.697 mean Dice against
# 0.682 with 16, of five cases 0.805 against 0.803 (benchmarks/results/label_efficiency_004_fold0_plateau_v64.md);
# with all 208 cases 2 views (14,600 encodings, mirroring TTA made valid) gave 0.876, as without views (..._views2.md)
MAX_VIEWS = 64
# where the head default comes from: Hippocampus fold 0, trained to plateau, mean foreground Dice (1 / 5 cases)
CPU_PRECISIONS = ("fp32", "int8")
CPU_PRECISION_REASONS = {
    "fp32": "the float32 encoder on a CPU (the fast path, same embeddings as the shipped network); "
            "samunet_plan_and_preprocess --cpu_precision int8 trades ~8% embedding error for ~1.9x encoder "
            "speed on a CPU with VNNI (none elsewhere)",
    "int8": "set by the user (--cpu_precision int8): the encoder's Linear layers in int8 on a CPU, ~1.9x "
            "the float32 path where the CPU has VNNI (elsewhere the same numbers, no faster), a trained head's "
            "and the zero-shot box Dice within 0.005 of float32 "
            "(benchmarks/results/int8_encoder.md); embeddings and trained heads are tied to it (a GPU runs float32)",
}
PLATEAU_EVIDENCE = ("in the plateau study (benchmarks/results/label_efficiency_004_fold0_plateau.md, Hippocampus fold "
                    "0, every model trained to its plateau or a 100-epoch cap) the hybrid head reached 0.682 / 0.803 "
                    "mean foreground Dice with 1 / 5 labelled cases, the heads on the embedding alone 0.506 / 0.701 "
                    "(AutoSAM) and 0.629 / 0.757 (CNN), with 20 cases 0.851 against 0.794 / 0.824, the hybrid head on "
                    "the embeddings of slices s-1, s, s+1 0.668 with 1 (64 views, against 0.697 for the 2d hybrid head "
                    "with 64), 0.797 with 5 (against 0.803-0.805), 0.850 with 20 (against 0.851) and 0.878 with all "
                    "(against 0.876); find-best's ensembles (--npz) reached 0.709 with 1 case (2d hybrid + s-1, s, "
                    "s+1 hybrid + CNN), 0.811 with 5 (2d hybrid, the same with deep supervision, CNN; nnU-Net 2d "
                    "0.814), 0.855 with 20 (s-1, s, s+1 hybrid + CNN + U-Net) and 0.884 with all (s-1, s, s+1 hybrid "
                    "+ CNN + U-Net) "
                    "(benchmarks/results/plateau_ensembles_004_fold0.md); at equal short budgets (100 x 8, "
                    "not converged) the hybrid head was also ahead on DRIVE (0.756 against 0.557, 4 labelled images) "
                    "and ISBI EM (0.930 against 0.918)")


def _choose_slice_axis(spacings: np.ndarray, shapes: np.ndarray) -> tuple[int, str]:
    median_spacing = np.median(spacings, 0)
    median_shape = np.median(shapes, 0)
    top = median_spacing.max()
    tied = [a for a in range(3) if median_spacing[a] >= top * 0.99]
    if len(tied) == 1:
        a = tied[0]
        return a, (f"axis {a} has the lowest resolution (median spacing {median_spacing.round(3).tolist()} mm); "
                   "slicing along it keeps every slice at full in-plane resolution, as nnU-Net's transpose does")
    a = min(tied, key=lambda t: (median_shape[t], t))
    return a, (f"median spacing {median_spacing.round(3).tolist()} mm is (nearly) isotropic over axes {tied}; "
               f"of those, axis {a} is the shortest (median {median_shape.round(1).tolist()} voxels), which gives "
               "the largest slices and the fewest encoder calls")


def _choose_input_size(spec: EncoderSpec, extent: float, override: int | None) -> tuple[int, str]:
    if override is not None:
        if not spec.valid_input_size(override):
            raise SamunetError(f"--input_size {override} is not valid for encoder {spec.name}: it must be a multiple "
                               f"of {spec.size_multiple} and at least {spec.min_input_size}")
        return override, "set by the user (--input_size)"
    # the embedding grid (input / stride) should resolve at least every second pixel of the slice
    wanted = extent * spec.stride / 2.0
    size = int(math.ceil(wanted / spec.size_multiple) * spec.size_multiple)
    size = max(spec.min_input_size, min(spec.native_input_size, size))
    if size == spec.native_input_size:
        return size, (f"the encoder's native input size: slices (median extent {extent:.0f} px) need at least "
                      f"{wanted:.0f} px so that the stride-{spec.stride} embedding resolves every second pixel")
    return size, (f"slices are small (median extent {extent:.0f} px): {size} px (a multiple of {spec.size_multiple} "
                  f">= {wanted:.0f}) lets the stride-{spec.stride} embedding resolve every second pixel at "
                  f"{(size / spec.native_input_size) ** 2:.2f}x the encoder cost of the native "
                  f"{spec.native_input_size} px")


def _choose_inplane_mode(extent: float, input_size: int, class_props: dict, target_spacing) -> tuple[str, str]:
    if extent <= input_size:
        return "resize", (f"slices (median extent {extent:.0f} px) fit into the {input_size} px encoder input and "
                          f"are resized whole (scale {input_size / extent:.2f})")
    scale = input_size / extent
    widths = [(p["median_width_mm"] / min(target_spacing), p["name"]) for p in class_props.values()
              if p.get("median_width_mm") is not None]
    if not widths:
        return "resize", f"no structure widths known; slices are resized whole (scale {scale:.2f})"
    width, name = min(widths)
    if width * scale < MIN_STRUCTURE_WIDTH_PX:
        return "sliding_window", (
            f"resizing slices of median extent {extent:.0f} px to {input_size} px (scale {scale:.2f}) would thin "
            f"class '{name}' (median width {width:.1f} px) to {width * scale:.1f} px < {MIN_STRUCTURE_WIDTH_PX} px; "
            f"{input_size} px tiles at the target spacing with step {TILE_STEP} keep it intact")
    return "resize", (f"resizing slices of median extent {extent:.0f} px to {input_size} px (scale {scale:.2f}) "
                      f"keeps the thinnest class '{name}' at {width * scale:.1f} px >= {MIN_STRUCTURE_WIDTH_PX} px")


def _normalisation(fingerprint: dict) -> list[dict]:
    schemes = []
    natural = fingerprint["io"] == ["natural2d"]
    dtypes = set(fingerprint["image_dtypes"])
    for c, name in enumerate(fingerprint["channel_names"]):
        stats = fingerprint["foreground_intensity_properties_per_channel"][str(c)]
        if name.strip().lower() == "ct":
            schemes.append({"channel": c, "name": name, "scheme": "ct_window",
                            "lower": stats["percentile_00_5"], "upper": stats["percentile_99_5"],
                            "reason": "CT has absolute units: window to the foreground 0.5-99.5 percentiles of the "
                                      "whole data set"})
        elif natural and dtypes <= {"uint8", "uint16"}:
            max_value = 255.0 if dtypes == {"uint8"} else 65535.0
            schemes.append({"channel": c, "name": name, "scheme": "natural_8bit", "max_value": max_value,
                            "reason": f"{'/'.join(sorted(dtypes))} natural images are used as they are "
                                      f"(divided by {max_value:.0f}), like the photographs SAM was trained on"})
        else:
            schemes.append({"channel": c, "name": name, "scheme": "percentile_clip",
                            "lower_percentile": 0.5, "upper_percentile": 99.5,
                            "reason": "no absolute intensity scale (e.g. MRI): each image is clipped to its own "
                                      "0.5-99.5 percentiles of non-zero voxels"})
    return schemes


def _channel_rule(fingerprint: dict, context: int) -> dict:
    names = {n.strip().lower() for n in fingerprint["channel_names"]}
    n = fingerprint["num_channels"]
    if n == 1:
        if context == 1:
            return {"type": "replicate", "reason": "one channel, replicated to the encoder's three input channels"}
        return {"type": "neighbour_slices",
                "reason": "one channel; slices s-1, s, s+1 fill the encoder's three input channels"}
    if context == 1 and n == 3 and (names in RGB_NAMES or fingerprint["io"] == ["natural2d"]):
        return {"type": "rgb", "reason": "three colour channels of one image go to the encoder as RGB"}
    return {"type": "encode_each_and_fuse",
            "reason": f"{n} channels ({', '.join(fingerprint['channel_names'])}) that are not one RGB image: each "
                      "channel is encoded on its own (as a grey image, or its slice stack for 2.5d) and the head "
                      f"fuses the {n} embeddings with a learned 1x1 convolution; no channel is dropped"}


def _tiles(shape_yx, patch: int) -> int:
    n = 1
    for length in shape_yx:
        n *= 1 if length <= patch else math.ceil((length - patch) / (patch * TILE_STEP)) + 1
    return n


def _head_estimate_mb(spec: EncoderSpec, input_size: int, num_classes: int) -> float:
    c, g, _ = spec.embedding_shape(input_size)
    emb_mb = c * g * g * 4 / 1e6
    # head activations kept for the backward pass: ~20 embedding-sized maps for the two-way transformer and the
    # upscaling path, plus logits and their gradients at full resolution
    return 20 * emb_mb + 3 * num_classes * input_size * input_size * 4 / 1e6


def _configuration(name: str, context: int, embedding_context: int, fingerprint: dict, spec: EncoderSpec,
                   opts: dict) -> dict:
    spacings = np.array(fingerprint["spacings"], float)
    shapes = np.array(fingerprint["shapes_after_crop"], float)
    if fingerprint["dims"] == [2]:
        slice_axis, axis_reason = 0, "2D images: every case is one slice"
    else:
        slice_axis, axis_reason = _choose_slice_axis(spacings, shapes)
    transpose = [slice_axis] + [a for a in range(3) if a != slice_axis]
    sp_t, sh_t = spacings[:, transpose], shapes[:, transpose]
    target_inplane = np.median(sp_t[:, 1:], 0)
    median_slice = np.median(sh_t[:, 1:] * sp_t[:, 1:] / target_inplane, 0)
    extent = float(median_slice.max())
    input_size, size_reason = _choose_input_size(spec, extent, opts.get("input_size"))
    mode, mode_reason = _choose_inplane_mode(extent, input_size, fingerprint["class_properties"], target_inplane)
    rule = _channel_rule(fingerprint, context)
    encodes_per_slice = fingerprint["num_channels"] if rule["type"] == "encode_each_and_fuse" else 1
    # encoder calls over the whole training set
    n_slices = 0
    n_images = 0
    for sp, sh in zip(sp_t, sh_t):
        yx = [int(round(n * s / t)) for n, s, t in zip(sh[1:], sp[1:], target_inplane)]
        tiles = _tiles(yx, input_size) if mode == "sliding_window" else 1
        n_slices += int(sh[0])
        n_images += int(sh[0]) * tiles * encodes_per_slice
    c, g, _ = spec.embedding_shape(input_size)
    cache_gb = n_images * c * g * g * 2 / 1e9
    gflop_total = n_images * spec.gflops(input_size)
    cache = cache_gb <= opts["disk_gb"]
    cache_reason = (f"{n_images} encoder inputs x {c}x{g}x{g} float16 = {cache_gb:.2f} GB "
                    f"{'fits' if cache else 'exceeds'} the disk budget of {opts['disk_gb']:.0f} GB")
    cache_reason += ("; the frozen encoder runs once per input instead of once per training step" if cache else
                     "; the encoder runs on the fly during training, with full spatial augmentation")
    num_classes = len(fingerprint["class_properties"])
    head_mb = _head_estimate_mb(spec, input_size, num_classes)
    per_sample = head_mb + (0.0 if cache else spec.mb_per_image(input_size) * encodes_per_slice)
    budget_mb = opts["memory_gb"] * 1000
    batch = int(max(MIN_BATCH_SIZE, min(MAX_BATCH_SIZE, budget_mb // per_sample)))
    batch_reason = (f"memory budget {opts['memory_gb']:.0f} GB / ~{per_sample:.0f} MB per sample "
                    f"({'head only, embeddings cached' if cache else 'encoder forward plus head'}), kept within "
                    f"[{MIN_BATCH_SIZE}, {MAX_BATCH_SIZE}]")
    if cache:
        head, head_reason = "hybrid", (f"the embeddings are cached, which the hybrid head (a U-Net on the slice fed "
                                       f"the frozen embedding at every scale) reads; {PLATEAU_EVIDENCE}")
    else:
        head, head_reason = uncached_head(spec)
    if opts.get("head"):
        head, head_reason = opts["head"], "set by the user (--head)"
    normalisation = _normalisation(fingerprint)
    train_inputs = max(1, int(n_images * (1 - 1 / 5)))  # a 5-fold training split
    iterations = int(min(MAX_ITERATIONS, max(MIN_ITERATIONS, math.ceil(train_inputs / batch))))
    epochs = NUM_EPOCHS_CACHED if cache else NUM_EPOCHS_ON_THE_FLY
    preprocessing = {
        "version": PREPROCESSING_VERSION,
        "transpose_forward": transpose,
        "target_spacing_inplane": [float(x) for x in target_inplane],
        "normalization": [{k: v for k, v in n.items() if k != "reason"} for n in normalisation],
        "crop": "nonzero",
    }
    config = {
        "data_identifier": f"{PLANS_NAME}_2d",
        "preprocessing_identity": stable_hash(preprocessing),
        "slice_context": context,
        "embedding_context": embedding_context,
        "embedding_cache": "2d" if embedding_context > 1 else name,  # whose cached embeddings it reads
        "embedding_context_reason": (
            "the head fuses the cached embeddings of slices s-1, s, s+1 (a learned 1x1 convolution that starts as "
            "their mean), so the encoder sees each slice alone as in 2d and the 2d embedding cache serves it"
            if embedding_context == 3 else "the head reads the embedding of its own slice (or slice stack) only"),
        "slice_axis": slice_axis,
        "slice_axis_reason": axis_reason,
        "transpose_forward": transpose,
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "spacing": [float(np.median(sp_t[:, 0]))] + [float(x) for x in target_inplane],
        "target_spacing_inplane": [float(x) for x in target_inplane],
        "spacing_reason": "median in-plane spacing of the training cases; the slice axis is never resampled",
        "median_slice_shape": [float(x) for x in median_slice.round(1)],
        "normalization": normalisation,
        "channel_rule": rule,
        "encoder_input_size": input_size,
        "input_size_reason": size_reason,
        "inplane_mode": mode,
        "patch_size": [input_size, input_size],
        "tile_step": TILE_STEP,
        "inplane_mode_reason": mode_reason,
        "head": head,
        "head_reason": head_reason,
        "batch_size": batch,
        "batch_size_reason": batch_reason,
        "num_epochs": epochs,
        "iterations_per_epoch": iterations,
        "training_reason": (f"one epoch draws about as many samples as a training fold has encoder inputs "
                            f"(~{train_inputs}), within [{MIN_ITERATIONS}, {MAX_ITERATIONS}] iterations; "
                            f"{epochs} epochs {'on cached embeddings' if cache else 'with on-the-fly encoding'}; "
                            "override with samunet_train --epochs"),
        "early_stopping_patience": EARLY_STOPPING_PATIENCE,
        "early_stopping_reason": (f"training stops once the moving average of the validation pseudo-Dice has not "
                                  f"improved for {EARLY_STOPPING_PATIENCE} epochs (the epochs above are the cap), "
                                  "so small or easy data sets stop at their plateau instead of a fixed guess; "
                                  "override with samunet_train --patience"),
        "initial_lr": dict(INITIAL_LR),
        "cache_embeddings": bool(cache),
        "estimated_cache_gb": round(cache_gb, 3),
        "cache_reason": cache_reason,
        "training_slices": n_slices,
        "encoder_inputs": n_images,
        "estimated_encoder_cpu_hours": round(gflop_total / CPU_GFLOPS_REFERENCE / 3600, 3),
        "encoder_cpu_hours_note": f"at {CPU_GFLOPS_REFERENCE:.0f} GFLOP/s (the fp32 reference encoder on 2 CPU cores)",
    }
    config["unet"] = canvas_block(config)
    config["hybrid"] = hybrid_block(config)
    config["augmented_views"] = _views_rule(config, spec, encodes_per_slice)
    config["cpu_num_epochs"], config["cpu_num_epochs_reason"] = _cpu_epochs(config)
    return config


def _views_rule(config: dict, spec: EncoderSpec, encodes_per_slice: int) -> dict:
    """How many augmented views of the labelled slices a hybrid run encodes (``augmented_views.views_budget``)."""
    encoder_s = spec.gflops(config["encoder_input_size"]) * encodes_per_slice / CPU_GFLOPS_REFERENCE
    seconds, size = CPU_SECONDS_PER_SAMPLE["hybrid"]
    head_s = seconds * (config["hybrid"]["canvas_size"] / size) ** 2
    return {"encoder_s_per_input": round(encoder_s, 4), "head_s_per_sample": round(head_s, 4),
            "budget_s": VIEW_BUDGET_S, "max_views": MAX_VIEWS,
            "reason": (f"the hybrid head trains on encoded augmented views of the labelled slices (rotation, scaling, "
                       f"mirroring with their true embeddings, so mirroring test-time augmentation is valid) while "
                       f"their encoder time (~{encoder_s:.2f} s per input at the CPU reference) stays within "
                       f"{VIEW_BUDGET_S:.0f} s and within the head time of the run's cap (~{head_s:.3f} s per "
                       f"sample x epochs x iterations x batch): up to {MAX_VIEWS} views where labels are few (on "
                       f"Hippocampus 64 views of one labelled case reached 0.697 mean Dice against 0.682 with 16, "
                       f"and of five 0.805 against 0.803), none where they are plentiful (2 views of all 208 "
                       f"gave 0.876, as none did) or the run is short; "
                       f"samunet_train --augmented_views overrides")}


def _cpu_epochs(config: dict) -> tuple[dict, str]:
    """Per head, the epoch cap on a CPU: the plans' epochs, or fewer where they would take over a few hours."""
    out = {}
    for head, (seconds, size) in CPU_SECONDS_PER_SAMPLE.items():
        side = config[head]["canvas_size"] if head in ("unet", "hybrid") else config["encoder_input_size"]
        epoch_s = config["iterations_per_epoch"] * config["batch_size"] * seconds * (side / size) ** 2
        out[head] = int(max(5, min(config["num_epochs"], CPU_HOURS_PER_FOLD * 3600 // max(epoch_s, 1e-6))))
    caps = ", ".join(f"{h}: {e}" for h, e in out.items())
    return out, (f"on a CPU (2 cores measured) the epoch cap is lowered so that one fold trains in at most about "
                 f"{CPU_HOURS_PER_FOLD:.0f} hours before early stopping ({caps} "
                 f"epochs of {config['iterations_per_epoch']} x {config['batch_size']}); on a GPU the full "
                 f"{config['num_epochs']}; samunet_train --epochs overrides both")


def _cpu_precision_of_this_machine(encoder: str) -> tuple[str, str]:
    """--cpu_precision auto: int8 where the planning machine's int8 kernel is exact (there it pays), else fp32."""
    from ..models.int8_linear import kernel_is_exact
    if encoder != "lite_medsam":
        return "fp32", f"--cpu_precision auto: {encoder} has no int8 path"
    if kernel_is_exact():
        return "int8", ("--cpu_precision auto: the planning machine's int8 kernel is exact (VNNI), where the int8 "
                        "path ran ~1.9x the float32 path; " + CPU_PRECISION_REASONS["int8"].split(": ", 1)[1])
    return "fp32", ("--cpu_precision auto: the planning machine's int8 kernel saturates (no VNNI), so int8 would "
                    "run no faster than float32 here")


def plan_experiment(fingerprint: dict, dataset_json: dict, encoder: str = "lite_medsam",
                    checkpoint: str | None = None, memory_gb: float = 8.0, disk_gb: float = 50.0,
                    input_size: int | None = None, head: str | None = None,
                    configurations: list[str] | None = None, seed: int = 12345,
                    cpu_precision: str = "fp32") -> dict:
    spec = get_encoder_spec(encoder)
    if cpu_precision not in CPU_PRECISIONS + ("auto",):
        raise SamunetError(f"--cpu_precision {cpu_precision}: choose {', '.join(CPU_PRECISIONS)} or auto")
    precision_reason = None
    if cpu_precision == "auto":
        cpu_precision, precision_reason = _cpu_precision_of_this_machine(encoder)
    if cpu_precision == "int8" and encoder != "lite_medsam":
        raise SamunetError(f"--cpu_precision int8 is a path of the lite_medsam encoder, not of {encoder}")
    if spec.needs_checkpoint and not checkpoint:
        raise SamunetError(f"encoder {encoder} needs its official checkpoint: pass --checkpoint PATH "
                           f"(its weights are never downloaded)")
    if head is not None and head not in HEADS:
        raise SamunetError(f"unknown head '{head}' (choose {', '.join(HEADS)})")
    opts = {"memory_gb": float(memory_gb), "disk_gb": float(disk_gb), "input_size": input_size, "head": head}
    # configuration -> (slices in one encoder input, cached embeddings of neighbouring slices the head fuses)
    available = {"2d": (1, 1)} if fingerprint["dims"] == [2] else {"2d": (1, 1), "2.5d": (3, 1), "2.5d_emb": (1, 3)}
    wanted = configurations or list(available)
    for c in wanted:
        if c not in available:
            raise SamunetError(f"configuration '{c}' is not available for {fingerprint['dataset_name']} "
                               f"(available: {', '.join(available)}; 2.5d and 2.5d_emb need 3D data)")
    spacings = np.array(fingerprint["spacings"], float)
    shapes = np.array(fingerprint["shapes_after_crop"], float)
    return {
        "dataset_name": fingerprint["dataset_name"],
        "plans_name": PLANS_NAME,
        "samunet_version": __version__,
        "seed": seed,
        "encoder": {"name": encoder, "checkpoint": checkpoint, **{k: v for k, v in spec.to_dict().items()
                                                                    if k != "name"},
                    "cpu_precision": cpu_precision,
                    "cpu_precision_reason": precision_reason or CPU_PRECISION_REASONS[cpu_precision]},
        "channel_names": fingerprint["channel_names"],
        "label_values": [int(v) for v in fingerprint["class_properties"]],
        "class_names": [p["name"] for p in fingerprint["class_properties"].values()],
        "file_ending": dataset_json["file_ending"],
        "original_median_spacing": [float(x) for x in np.median(spacings, 0)],
        "original_median_shape": [float(x) for x in np.median(shapes, 0)],
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
        "budgets": {"memory_gb": opts["memory_gb"], "disk_gb": opts["disk_gb"]},
        "configurations": {c: _configuration(c, *available[c], fingerprint, spec, opts) for c in wanted},
    }
