"""Dynamic int8 linear layers whose results do not depend on the CPU.

    layer = Int8Linear(weight, bias)   # weight (out, in), bias (out,): float32
    y = layer(x)                       # x (..., in) float32 -> y (..., out) float32

The numerics samunet calls 'int8' (`encoder_identity(...)["numerics"]`):

* weights: symmetric int8 per output channel, scale max|w| / 127;
* activations: quantised at every call to unsigned 8 bits over their full range [min(x, 0), max(x, 0)], with
  fbgemm's scale and zero point (scale (max - min) / 255, zero point round(-min / scale));
* products summed exactly (32-bit integers), then scaled back to float32 and the bias added.

torch's dynamic int8 linear (`quantized::linear_dynamic`, fbgemm) computes exactly this on CPUs whose int8 dot
product accumulates into 32 bits (AVX512-VNNI). On CPUs without it (AVX2, AVX-512 without VNNI) fbgemm adds
pairs of u8 x s8 products in saturating 16-bit registers (vpmaddubsw); the full 8-bit activation range overflows
them (255 * 127 * 2 > 32767), so the same layer gives other numbers there: on a 2-core AVX2 EPYC the LiteMedSAM
embeddings ended 38% off float32 (mean relative difference) instead of 8%. torch's own remedy, `reduce_range`
(7-bit activations), costs accuracy everywhere (``benchmarks/int8_encoder.py``).

So `kernel_is_exact()` probes fbgemm once per process with an input that overflows 16-bit pair sums. Where the
kernel is exact it is used; elsewhere the same arithmetic is emulated in float32 (integer-valued activations times
dequantised weights in a float32 matrix product, then the activation scale): equal to the integer result up to
float32 rounding, as fast as the float32 layer rather than faster, but with the same embeddings. A cache or a head
made with 'int8' on one CPU therefore stays valid on any other; only the speed differs.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

QMAX = 255  # activations: unsigned 8 bits, full range


def _quantise_weights(weight: torch.Tensor, bias: torch.Tensor):
    """(out, in) float -> torch's per-channel symmetric qint8 tensor (scale max|w| / 127), prepacked with ``bias``."""
    w = weight.detach().float().cpu()
    scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch marks its quantised tensor constructors deprecated; they still work
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
        return q, torch.ops.quantized.linear_prepack(q, bias.detach().float().cpu())


@functools.lru_cache(maxsize=None)
def kernel_is_exact() -> bool:
    """Whether torch's dynamic int8 linear sums u8 x s8 products without 16-bit saturation on this CPU."""
    try:
        if not ({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines)):
            return False
        # every activation quantises to 255 and every weight to +-127: each pair of products is +-64770
        x = torch.ones(16, 256)
        signs = torch.ones(8, 256)
        signs[1::2] = -1
        ones = torch.zeros(8)
        y = torch.ops.quantized.linear_dynamic(x, _quantise_weights(signs, ones)[1], False)
        return bool(torch.allclose(y, x @ signs.t(), rtol=1e-4, atol=1e-3))
    except (RuntimeError, AttributeError):  # a torch build without quantised CPU kernels
        return False


class Int8Linear:
    """``F.linear(x, weight, bias)`` in samunet's int8 numerics (module docstring); CPU tensors only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, exact_kernel: bool | None = None):
        q, self.packed = _quantise_weights(weight, bias)
        self.out_features = q.shape[0]
        self.use_kernel = kernel_is_exact() if exact_kernel is None else exact_kernel
        if not self.use_kernel:  # (in, out) dequantised weights: the integers times their channel's scale
            scale = q.q_per_channel_scales().float()
            self.weight_t = (q.int_repr().float() * scale[:, None]).t().contiguous()
            self.bias = bias.detach().float().cpu().clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if self.use_kernel:
            out = torch.ops.quantized.linear_dynamic(rows, self.packed, False)
        else:
            out = self._emulated(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def _emulated(self, rows: torch.Tensor) -> torch.Tensor:
        lo = min(float(rows.min()), 0.0)
        hi = max(float(rows.max()), 0.0)
        scale = (hi - lo) / QMAX
        if scale == 0.0:
            scale = 0.1  # fbgemm's choice for an all-zero input
        zero_point = min(max(round(-lo / scale), 0), QMAX)
        # round(x / scale) + zero point, clamped to [0, 255], minus the zero point again: integer-valued floats
        centred = torch.round(rows * (1.0 / scale)).clamp_(-zero_point, QMAX - zero_point)
        return torch.addmm(self.bias, centred, self.weight_t, alpha=scale)
