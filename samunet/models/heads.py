"""Trainable segmentation heads on frozen encoder embeddings (prompt-free, all classes in one pass).

    head = build_head("autosam", encoder, num_classes=3)
    logits = head(embeddings)      # (B, k * embed_dim, g, g)  ->  (B, num_classes, S, S)

with g = encoder.grid_size, S = encoder.input_size and k = in_channels_multiplier: a data set with k input
channels has each channel encoded separately and the k embeddings concatenated along channels; every head
first fuses them back to embed_dim with a 1x1 convolution initialised to their average (identity when k = 1).

Heads:
* `autosam`: SAM's mask decoder without prompts. Its two-way transformer, upscaling path and hypernetwork MLPs
  start as copies of the encoder's own pretrained mask decoder; there is one learned output token per class
  (background included) initialised from the decoder's mask tokens (cycled, with a little noise where a token
  repeats), and the dense 'no mask' prompt embedding becomes a learned bias on the image embedding. The dense
  positional encoding of the pretrained prompt encoder for the embedding grid is a fixed buffer.
* `cnn`: small convolutional decoder, one 2x transposed-convolution stage per factor of 2 in the stride.
* `linear`: per-pixel linear map of the embedding, upsampled bilinearly.

Heads never hold a reference to the encoder: only their own parameters train.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from samunet.models.specs import ENCODER_HEADS
from samunet.models.token_attention import two_way_attention, upscale_and_project

HEAD_NAMES = ENCODER_HEADS  # the heads on the frozen encoder that build_head constructs


class ChannelFusion(nn.Module):
    """(B, k * D, g, g) -> (B, D, g, g); starts as the mean of the k embeddings."""

    def __init__(self, embed_dim: int, multiplier: int):
        super().__init__()
        self.multiplier = multiplier
        if multiplier == 1:
            self.conv = None
            return
        self.conv = nn.Conv2d(embed_dim * multiplier, embed_dim, 1)
        with torch.no_grad():
            eye = torch.eye(embed_dim) / multiplier
            self.conv.weight.copy_(eye.repeat(1, multiplier)[:, :, None, None])
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.conv is None else self.conv(x)


class _Head(nn.Module):
    def __init__(self, encoder, num_classes: int, in_channels_multiplier: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        if in_channels_multiplier < 1:
            raise ValueError("in_channels_multiplier must be at least 1")
        self.num_classes = int(num_classes)
        self.embed_dim = encoder.embed_dim
        self.input_size = encoder.input_size
        self.grid_size = encoder.grid_size
        self.in_channels_multiplier = int(in_channels_multiplier)
        self.encoder_name = encoder.name
        self.fusion = ChannelFusion(self.embed_dim, self.in_channels_multiplier)

    def check(self, embeddings: torch.Tensor) -> None:
        expected = (self.embed_dim * self.in_channels_multiplier, self.grid_size, self.grid_size)
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects embeddings of shape (B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {tuple(embeddings.shape)}")

    def to_input_size(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] == self.input_size and logits.shape[-2] == self.input_size:
            return logits
        return F.interpolate(logits, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.check(embeddings)
        return self.to_input_size(self.decode(self.fusion(embeddings)))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LinearHead(_Head):
    def __init__(self, encoder, num_classes: int, in_channels_multiplier: int = 1):
        super().__init__(encoder, num_classes, in_channels_multiplier)
        self.classifier = nn.Conv2d(self.embed_dim, self.num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class CNNHead(_Head):
    def __init__(self, encoder, num_classes: int, in_channels_multiplier: int = 1, width: int = 128,
                 min_width: int = 16):
        super().__init__(encoder, num_classes, in_channels_multiplier)
        stages = int(round(math.log2(encoder.stride)))
        if 2 ** stages != encoder.stride:
            raise ValueError(f"cnn head needs a power-of-two stride, encoder has {encoder.stride}")
        self.stem = nn.Sequential(nn.Conv2d(self.embed_dim, width, 3, padding=1), nn.GroupNorm(_groups(width), width),
                                  nn.GELU())
        ups = []
        channels = width
        for _ in range(stages):
            out = max(channels // 2, min_width)
            ups.append(nn.Sequential(
                nn.ConvTranspose2d(channels, out, 2, stride=2), nn.GroupNorm(_groups(out), out), nn.GELU(),
                nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(_groups(out), out), nn.GELU()))
            channels = out
        self.up = nn.Sequential(*ups)
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.up(self.stem(x)))


class AutoSAMHead(_Head):
    def __init__(self, encoder, num_classes: int, in_channels_multiplier: int = 1, token_noise: float = 0.02,
                 seed: int = 0):
        super().__init__(encoder, num_classes, in_channels_multiplier)
        decoder, prompt_encoder = encoder.mask_decoder, encoder.prompt_encoder
        if decoder is None or prompt_encoder is None:
            raise ValueError(f"encoder '{encoder.name}' has no SAM mask decoder to start an AutoSAM head from")
        if tuple(prompt_encoder.image_embedding_size) != (self.grid_size, self.grid_size):
            raise ValueError("the encoder's prompt encoder was built for another embedding grid")
        self.transformer = copy.deepcopy(decoder.transformer)
        self.output_upscaling = copy.deepcopy(decoder.output_upscaling)
        n_pretrained = decoder.num_mask_tokens
        self.pretrained_token_index = [c % n_pretrained for c in range(self.num_classes)]
        self.hypernetworks = nn.ModuleList(
            copy.deepcopy(decoder.output_hypernetworks_mlps[i]) for i in self.pretrained_token_index)
        tokens = decoder.mask_tokens.weight.detach()[self.pretrained_token_index].clone()
        repeats = torch.tensor([c >= n_pretrained for c in range(self.num_classes)])
        if repeats.any():
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(tokens.shape, generator=generator) * token_noise * tokens.std()
            tokens[repeats] += noise[repeats].to(tokens)
        self.class_tokens = nn.Parameter(tokens)
        self.dense_bias = nn.Parameter(prompt_encoder.no_mask_embed.weight.detach().reshape(-1).clone())
        with torch.no_grad():
            image_pe = prompt_encoder.get_dense_pe().detach().clone()
        self.register_buffer("image_pe", image_pe)  # (1, D, g, g)
        for p in self.parameters():
            p.requires_grad_(True)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        src = x + self.dense_bias.view(1, d, 1, 1)
        tokens = self.class_tokens.unsqueeze(0).expand(b, -1, -1)
        pos = self.image_pe.expand(b, -1, -1, -1)
        hs, keys = two_way_attention(self.transformer, src, pos, tokens)      # (B, C, D), (B, g*g, D)
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)  # (B, C, D/8)
        return upscale_and_project(self.output_upscaling, keys, h, w, hyper)  # (B, C, 4g, 4g)


_HEADS = {"autosam": AutoSAMHead, "cnn": CNNHead, "linear": LinearHead}


def build_head(name: str, encoder, num_classes: int, in_channels_multiplier: int = 1) -> _Head:
    """Head `name` for `encoder`'s embeddings, predicting `num_classes` classes (background included)."""
    try:
        cls = _HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head '{name}'; known heads: {', '.join(HEAD_NAMES)}") from None
    head = cls(encoder, num_classes, in_channels_multiplier=in_channels_multiplier)
    return head.to(encoder.device)
