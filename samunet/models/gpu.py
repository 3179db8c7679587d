"""GPU facts that matter for planning and benchmarks: memory, bfloat16 support and peak, and the GPU settings
samunet applies.

    facts = gpu_facts(0)   # {"name", "memory_gb", "bf16": bool, "bf16_tflops", "peak_source", "capability"}

Peaks are the vendors' published dense (no sparsity) bfloat16 tensor-core figures for the common data-centre and
workstation GPUs; an unknown GPU gets an estimate from its streaming multiprocessors and clock, marked as such.
Nothing here needs a GPU to import; every function that asks about one says so when there is none.
"""
from __future__ import annotations

import torch

from samunet.utils import SamunetError

# dense bf16 tensor TFLOP/s as published (SXM/board versions where several exist); matched by substring, in order
BF16_PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("A40", 149.7), ("A30", 165.0), ("A10G", 70.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 6000 Ada", 364.0), ("RTX A6000", 154.8),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)
# bf16 tensor FLOP per clock per SM by compute capability (dense), for GPUs not in the table
_BF16_FLOP_PER_CLOCK_PER_SM = {(8, 0): 2048, (8, 6): 1024, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SamunetError("no CUDA GPU: PyTorch sees none on this machine (torch.cuda.is_available() is False; "
                           f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")


def gpu_facts(index: int = 0) -> dict:
    require_cuda()
    p = torch.cuda.get_device_properties(index)
    cap = (p.major, p.minor)
    peak, source = None, "none"
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in p.name:
            peak, source = tflops, f"published dense bf16 peak of the {key}"
            break
    if peak is None and cap in _BF16_FLOP_PER_CLOCK_PER_SM:
        clock_ghz = getattr(p, "clock_rate", 0) / 1e6 or 1.5  # kHz -> GHz where torch reports it
        peak = p.multi_processor_count * _BF16_FLOP_PER_CLOCK_PER_SM[cap] * clock_ghz / 1000
        source = f"estimate: {p.multi_processor_count} SMs x {_BF16_FLOP_PER_CLOCK_PER_SM[cap]} FLOP/clock x " \
                 f"{clock_ghz:.2f} GHz"
    return {"name": p.name, "memory_gb": p.total_memory / 1e9, "capability": f"{p.major}.{p.minor}",
            "bf16": bool(torch.cuda.is_bf16_supported()), "bf16_tflops": peak, "peak_source": source,
            "multi_processors": p.multi_processor_count}


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for a device: bfloat16 on GPUs that have it, float16 (with gradient scaling) on older
    GPUs, none on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prefer_channels_last(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Convolution-heavy models (the U-Net, the hybrid head, the cnn head) in channels-last layout on a GPU,
    where cuDNN's tensor-core kernels want it; unchanged on the CPU."""
    if torch.device(device).type == "cuda":
        return model.to(memory_format=torch.channels_last)
    return model
