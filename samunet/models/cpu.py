"""CPU facts and process settings that matter for encoder throughput.

* `tune_allocator()` keeps large freed blocks inside the process heap (glibc `mallopt`). By default glibc
  returns every block of 32 MB or more to the kernel when it is freed, so each large activation tensor of the
  encoder (a 256x256x256 float map is 64 MB per image) is paid for again in page faults on the next forward
  pass. On the 2-core test machine that was the largest single cost of the LiteMedSAM encoder: element-wise
  ops on such tensors ran 3-4x slower than from reused memory. The setting is process-wide and only changes
  where memory comes from, never what is computed; the price is that the process keeps its peak heap size.
* `cpu_flags()` / `peak_fp32_gflops()` describe the machine for benchmarks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ALLOCATOR_TUNED = False


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Serve blocks below `mmap_threshold` bytes from the heap and keep up to `trim_threshold` bytes of free
    heap. Returns True when the settings are in effect (glibc only; a no-op returning False elsewhere)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    _ALLOCATOR_TUNED = ok
    return ok


def allocator_tuned() -> bool:
    return _ALLOCATOR_TUNED


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fp32_flops_per_cycle(flags: set[str] | None = None) -> tuple[int, str]:
    """FP32 FLOPs per cycle per core, assuming two FMA pipes of the widest vector width the CPU reports."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 64, "2 FMA pipes x 16 fp32 lanes (AVX-512) x 2 FLOP"
    if "fma" in flags or "avx2" in flags:
        return 32, "2 FMA pipes x 8 fp32 lanes (AVX2/FMA3, no AVX-512) x 2 FLOP"
    return 8, "no FMA: 2 pipes x 4 lanes (SSE)"


def peak_fp32_gflops(cores: int | None = None, ghz: float | None = None) -> dict:
    cores = usable_cores() if cores is None else cores
    if ghz is None:
        mhz = cpu_mhz()
        ghz = mhz / 1000.0 if mhz else 2.0
    per_cycle, how = fp32_flops_per_cycle()
    return {
        "cores": cores,
        "ghz": round(ghz, 3),
        "flops_per_cycle_per_core": per_cycle,
        "assumption": f"{cores} cores x {ghz:.2f} GHz (reported clock, no boost) x {how}",
        "peak_gflops": cores * ghz * per_cycle,
    }
