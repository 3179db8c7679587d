"""The planner's rules for the device a run trains on: batch size from the device's memory, and whether the encoder
is cheap enough there to run on every augmented batch (full augmentation) instead of reading cached embeddings.

The plans are written once, before anyone knows which GPU will train; these rules take the plans' per-sample
estimates and the device's facts (``samunet.models.gpu.gpu_facts``) and are applied when training starts on a GPU,
every choice with its reason (written to the training log and ``debug.json``)::

    plan = device_training_plan(config, spec, head, memory_gb=141, bf16_tflops=989, n_enc=1)
    plan["batch_size"], plan["batch_size_reason"], plan["on_the_fly"], plan["on_the_fly_reason"]
"""
from __future__ import annotations

from samunet.models.specs import EncoderSpec, HYBRID_HEADS, IMAGE_MODELS
from samunet.planning.planner import _head_estimate_mb

MEMORY_FRACTION = 0.6            # of the device's memory one training batch may use (the rest: weights, workspace)
MIN_BATCH, MAX_BATCH = 2, 32     # the planner's range (nnU-Net's 2d batches lie in it too)
ENCODER_EFFICIENCY = 0.3         # fraction of the bf16 peak a ViT/TinyViT forward reaches in practice
ON_THE_FLY_SECONDS_PER_EPOCH = 60.0  # the most encoder time per epoch worth paying for full augmentation


def device_training_plan(config: dict, spec: EncoderSpec, head: str, memory_gb: float, bf16_tflops: float | None,
                         n_enc: int = 1, num_classes: int = 2, iterations: int | None = None) -> dict:
    """Batch size and encoding mode for training ``head`` of ``config`` on a device with ``memory_gb`` of memory and
    a bfloat16 peak of ``bf16_tflops`` (None: unknown, the encoder is then never run on the fly)."""
    size = int(config["encoder_input_size"])
    iterations = int(iterations or config["iterations_per_epoch"])
    if head in IMAGE_MODELS:
        on_the_fly, why = False, "the U-Net reads augmented images and never runs the encoder"
    elif head in HYBRID_HEADS:
        on_the_fly, why = False, "the hybrid head reads the cached embeddings (and their augmented views)"
    elif not bf16_tflops:
        on_the_fly, why = False, "the device's bfloat16 peak is unknown; the plans' choice stands"
    else:
        per_image_s = spec.gflops(size) * n_enc / (bf16_tflops * 1000 * ENCODER_EFFICIENCY)
        batch_guess = MAX_BATCH
        epoch_s = iterations * batch_guess * per_image_s
        on_the_fly = epoch_s <= ON_THE_FLY_SECONDS_PER_EPOCH
        why = (f"encoder {spec.name} at {size} px: {spec.gflops(size) * n_enc:.1f} GFLOP per sample, at "
               f"{ENCODER_EFFICIENCY:.0%} of {bf16_tflops:.0f} bf16 TFLOP/s about {epoch_s:.1f} s per epoch of "
               f"{iterations} x {batch_guess}; {'within' if on_the_fly else 'over'} the "
               f"{ON_THE_FLY_SECONDS_PER_EPOCH:.0f} s "
               f"budget, so " + ("every augmented batch is encoded afresh (full augmentation: rotation, scaling, "
                                 "mirroring, intensity) instead of reading the cache" if on_the_fly else
                                 "the cached embeddings are used as the plans say"))
    per_sample = _head_estimate_mb(spec, size, num_classes)  # the planner's estimate
    if head in IMAGE_MODELS or head in HYBRID_HEADS:
        per_sample *= 2  # a U-Net's activations at the input resolution on top of the head estimate
    if on_the_fly:
        per_sample += spec.mb_per_image(size) * n_enc / 2  # the encoder's activations, bfloat16
    batch = int(max(MIN_BATCH, min(MAX_BATCH, memory_gb * 1000 * MEMORY_FRACTION // per_sample)))
    return {"batch_size": batch,
            "batch_size_reason": (f"{MEMORY_FRACTION:.0%} of {memory_gb:.0f} GB device memory / ~{per_sample:.0f} MB "
                                  f"per sample, within [{MIN_BATCH}, {MAX_BATCH}]"),
            "on_the_fly": bool(on_the_fly), "on_the_fly_reason": why}
