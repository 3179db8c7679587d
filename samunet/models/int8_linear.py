"""Dynamic int8 linear layers whose results do not depend on the CPU.

    layer = Int8Linear(weight, bias)   # weight (out, in), bias (out,): float32
    y = layer(x)                       # x (..., in) float32 -> y (..., out) float32

The numerics samunet calls 'int8' (`encoder_identity(...)["numerics"]`):

* weights: symmetric int8 per output channel, scale max|w| / 127;
* activations: quantised to unsigned 8 bits over their full range [min(x, 0), max(x, 0)], one range per image
  (so that an image's embedding does not depend on the batch it is encoded in), with fbgemm's scale and zero
  point (scale (max - min) / 255, zero point round(-min / scale));
* products summed exactly (32-bit integers), then scaled back to float32 and the bias added.

torch's dynamic int8 linear (`quantized::linear_dynamic`, fbgemm) computes exactly this on CPUs whose int8 dot
product accumulates into 32 bits (AVX512-VNNI). On CPUs without it (AVX2, AVX-512 without VNNI) fbgemm adds
pairs of u8 x s8 products in saturating 16-bit registers (vpmaddubsw); the full 8-bit activation range overflows
them (255 * 127 * 2 > 32767), so the same layer gives other numbers there: on a 2-core AVX2 EPYC the LiteMedSAM
embeddings ended 36-38% off float32 (mean relative difference) instead of 8%. torch's own remedy, `reduce_range`
(7-bit activations), costs accuracy everywhere (``benchmarks/int8_encoder.py``).

So `kernel_is_exact()` probes fbgemm once per process with an input that overflows 16-bit pair sums. Where the
kernel is exact it is used; elsewhere the same arithmetic is emulated in float32 (integer-valued activations times
dequantised weights in a float32 matrix product, then the activation scale): equal to the integer result up to
float32 rounding, no faster than the float32 layer (0.87x of the float32 encoder on an AVX2 CPU), but with the
same embeddings. A cache or a head made with 'int8' on one CPU therefore stays valid on any other; only the speed
differs.
"""
from __future__ import annotations

import functools
import warnings

import torch

QMAX = 255  # activations: unsigned 8 bits, full range


def _quantise_weights(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) float -> torch's per-channel symmetric qint8 tensor (scale max|w| / 127)."""
    w = weight.detach().float().cpu()
    scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch marks its quantised tensor constructors deprecated; they still work
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)


def _pack(q: torch.Tensor, bias: torch.Tensor):
    """``q`` prepacked with ``bias`` for torch's dynamic int8 linear."""
    return torch.ops.quantized.linear_prepack(q, bias.detach().float().cpu())


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
        zero_bias = torch.zeros(8)
        y = torch.ops.quantized.linear_dynamic(x, _pack(_quantise_weights(signs), zero_bias), False)
        return bool(torch.allclose(y, x @ signs.t(), rtol=1e-4, atol=1e-3))
    except (RuntimeError, AttributeError):  # a torch build without quantised CPU kernels
        return False


class Int8Linear:
    """``F.linear(x, weight, bias)`` in samunet's int8 numerics (module docstring); CPU tensors only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, exact_kernel: bool | None = None):
        q = _quantise_weights(weight)
        self.out_features = q.shape[0]
        self.use_kernel = kernel_is_exact() if exact_kernel is None else exact_kernel
        if self.use_kernel:
            self.packed = _pack(q, bias)
        else:  # (in, out) dequantised weights: the integers times their channel's scale
            scale = q.q_per_channel_scales().float()
            self.weight_t = (q.int_repr().float() * scale[:, None]).t().contiguous()
            self.bias = bias.detach().float().cpu().clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ..., in) -> (B, ..., out); each x[b] (one image's tokens) quantised on its own range, so an
        image's result never depends on the batch it came in. A 2-D x (rows, in) is one sample."""
        samples = x.reshape(1 if x.dim() <= 2 else x.shape[0], -1, x.shape[-1])
        if self.use_kernel:
            out = torch.stack([torch.ops.quantized.linear_dynamic(v.contiguous(), self.packed, False)
                               for v in samples])
        else:
            out = self._emulated(samples)
        return out.view(*x.shape[:-1], self.out_features)

    def _emulated(self, samples: torch.Tensor) -> torch.Tensor:
        """(B, rows, in) -> (B, rows, out), activations quantised per sample as fbgemm does per call."""
        b = samples.shape[0]
        lo = samples.amin((1, 2)).double().clamp(max=0.0)
        hi = samples.amax((1, 2)).double().clamp(min=0.0)
        scale = (hi - lo) / QMAX
        scale = torch.where(scale == 0, torch.full_like(scale, 0.1), scale)  # fbgemm's choice for all zeros
        zero_point = torch.round(-lo / scale).clamp(0, QMAX)
        # round(x / scale) + zero point, clamped to [0, 255], minus the zero point again: integer-valued floats
        centred = torch.round(samples * (1.0 / scale).float().view(b, 1, 1))
        centred = torch.clamp(centred, min=(-zero_point).float().view(b, 1, 1),
                              max=(QMAX - zero_point).float().view(b, 1, 1))
        out = torch.matmul(centred, self.weight_t)
        return out.mul_(scale.float().view(b, 1, 1)).add_(self.bias)
