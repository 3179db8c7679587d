"""The hybrid head: a U-Net on the slice at the data's own resolution, fed the frozen SAM embedding at every scale.

    head = build_hybrid(plans_config["hybrid"], encoder, num_classes=3)
    logits = head(embeddings, images)   # (B, c*k*D, g, g), (B, 3k, Q, Q)  ->  (B, num_classes, Q, Q)

with k channels encoded separately and c = 3 cached embeddings of neighbouring slices fused (``2.5d_emb``; else 1).

Why: a head that sees only the embedding decodes boundaries from a grid at a quarter (LiteMedSAM) or a sixteenth
(SAM ViT) of the encoder input, and the encoder input is itself the slice resized to the encoder's size; a U-Net
trained from scratch sees every pixel but has no prior, so it needs many labelled cases. The hybrid head is both:

* **Image path**: dynamic-network-architectures' ``PlainConvEncoder`` / ``UNetDecoder``, configured by nnU-Net's
  2d rule (``unet_block``) for a Q x Q canvas, where Q is the planner's ``hybrid.canvas_size`` (the U-Net's
  canvas, ``canvas_block``): the median slice extent rounded up to a multiple of 16 and capped at the encoder
  input P (Hippocampus: 64 px for slices of about 36 x 50 px, against P = 128). The slice is laid out on the canvas
  exactly as on the encoder input (longest side scaled to the canvas, top-left, zero padding; in sliding-window
  mode Q = P and the tiles coincide), so the canvas and the embedding grid cover the same extent and relate by a
  uniform scale. Its cost per iteration is that of a 2d nnU-Net on a Q x Q patch.
* **Embedding path**: the frozen embedding (fused over channels as in every head, plus the pretrained "no mask"
  dense prompt) goes through a copy of the pretrained SAM mask decoder's upscaling path (two 2x transposed
  convolutions, 256 -> 64 -> 32 channels for LiteMedSAM), the one part of the decoder that needs no prompt tokens;
  this gives dense pretrained features at the embedding grid g, 2g and 4g. The transformer of the decoder is left
  out: it needs tokens, and it costs as much per sample as the whole image path.
* **Injection**: after every encoder stage k of the image path (feature map Q / 2^k), the SAM feature whose
  resolution is nearest at or above that size is resampled to it and added through a 1x1 convolution. Deeper
  stages therefore see SAM's semantics, shallower ones SAM's upscaled features beside the image's own edges, and
  the decoder's skip connections carry both. With few labels the network can lean on the pretrained features;
  with many, it has the capacity of nnU-Net's 2d network.

Encoders without a pretrained mask decoder (the tiny test encoder) get the same upscaling path freshly initialised.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from samunet.models.heads import ChannelFusion
from samunet.models.unet import _init_weights, canvas_block, train_only_used_outputs


def hybrid_block(config: dict) -> dict:
    """The plans' ``hybrid`` block: the image path's canvas (``canvas_block``, as the U-Net's) and its topology."""
    return canvas_block(config)


def _upscaling_like_sam(dim: int) -> nn.Sequential:
    class LayerNorm2d(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

        def forward(self, x):
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]

    return nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
                         nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU())


class HybridHead(nn.Module):
    """U-Net image path with frozen-embedding features injected at every encoder stage."""

    takes_images = False
    takes_images_and_embeddings = True

    def __init__(self, architecture: dict, encoder, num_classes: int, in_channels_multiplier: int = 1,
                 embedding_context: int = 1):
        super().__init__()
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
        self.architecture = {k: v for k, v in architecture.items() if not k.endswith("reason")}
        a = self.architecture
        self.num_classes = int(num_classes)
        self.in_channels_multiplier = int(in_channels_multiplier)
        self.embedding_multiplier = self.in_channels_multiplier * int(embedding_context)
        self.embed_dim, self.grid_size = encoder.embed_dim, encoder.grid_size
        self.encoder_name = encoder.name
        self.input_size = int(a["canvas_size"])     # logits come out on the Q x Q canvas
        self.in_channels = 3 * self.in_channels_multiplier
        self.fusion = ChannelFusion(self.embed_dim, self.embedding_multiplier)
        decoder = getattr(encoder, "mask_decoder", None)
        prompt_encoder = getattr(encoder, "prompt_encoder", None)
        if decoder is not None:
            self.sam_upscaling = copy.deepcopy(decoder.output_upscaling)
        else:
            self.sam_upscaling = _upscaling_like_sam(self.embed_dim)
        bias = prompt_encoder.no_mask_embed.weight.detach().reshape(-1).clone() if prompt_encoder is not None \
            else torch.zeros(self.embed_dim)
        self.dense_bias = nn.Parameter(bias)
        conv_kw = dict(conv_op=nn.Conv2d, conv_bias=True, norm_op=nn.InstanceNorm2d,
                       norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                       nonlin_kwargs={"inplace": True})
        self.image_encoder = PlainConvEncoder(self.in_channels, a["n_stages"], a["features_per_stage"],
                                              kernel_sizes=a["kernel_sizes"], strides=a["strides"],
                                              n_conv_per_stage=a["n_conv_per_stage"], return_skips=True, **conv_kw)
        self.decoder = UNetDecoder(self.image_encoder, self.num_classes, a["n_conv_per_stage_decoder"],
                                   deep_supervision=False)
        self.deep_supervision = bool(a.get("deep_supervision", False))  # training only: see forward
        train_only_used_outputs(self.decoder, self.deep_supervision)
        self.image_encoder.apply(_init_weights)
        self.decoder.apply(_init_weights)
        # SAM feature levels: (channels, side of the map covering the canvas) at g, 2g, 4g
        levels = [(self.embed_dim, self.grid_size), (self.embed_dim // 4, 2 * self.grid_size),
                  (self.embed_dim // 8, 4 * self.grid_size)]
        self.source_level = []
        inject = []
        for feats, side in zip(a["features_per_stage"], [s[0] for s in a["feature_map_sizes"]]):
            at_or_above = [i for i, (_, n) in enumerate(levels) if n >= side]
            level = min(at_or_above, key=lambda i: levels[i][1]) if at_or_above else 2
            self.source_level.append(level)
            inject.append(nn.Conv2d(levels[level][0], feats, 1))
        self.inject = nn.ModuleList(inject)
        self.stage_sizes = [int(s[0]) for s in a["feature_map_sizes"]]

    def sam_features(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """(B, k*D, g, g) -> pretrained dense features at g, 2g and 4g (only the levels some stage uses)."""
        x = self.fusion(embeddings) + self.dense_bias.view(1, -1, 1, 1)
        deepest = max(self.source_level)
        up = self.sam_upscaling
        half = up[2](up[1](up[0](x))) if deepest >= 1 else None  # transposed conv, layer norm, activation
        full = up[4](up[3](half)) if deepest >= 2 else None      # (B, D/8, 4g, 4g)
        return [x, half, full]

    def forward(self, embeddings: torch.Tensor, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits (B, num_classes, Q, Q); in training with the block's ``deep_supervision``, a list of the logits
        of every decoder stage, Q x Q first, each half the size of the one before (nnU-Net's deep supervision)."""
        want_e = (self.embed_dim * self.embedding_multiplier, self.grid_size, self.grid_size)
        want_i = (self.in_channels, self.input_size, self.input_size)
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:]) != want_e or images.ndim != 4 \
                or tuple(images.shape[1:]) != want_i or len(images) != len(embeddings):
            raise ValueError(f"HybridHead expects embeddings (B, {', '.join(map(str, want_e))}) and images "
                             f"(B, {', '.join(map(str, want_i))}), got {tuple(embeddings.shape)} and "
                             f"{tuple(images.shape)}")
        levels = self.sam_features(embeddings)
        skips = []
        x = images
        for k, stage in enumerate(self.image_encoder.stages):
            x = stage(x)
            src = levels[self.source_level[k]]
            side = self.stage_sizes[k]
            if src.shape[-1] != side:
                mode = "area" if src.shape[-1] > side else "bilinear"
                src = F.interpolate(src, size=(side, side), mode=mode,
                                    **({} if mode == "area" else {"align_corners": False}))
            x = x + self.inject[k](src)
            skips.append(x)
        self.decoder.deep_supervision = self.deep_supervision and self.training
        return self.decoder(skips)


def build_hybrid(architecture: dict, encoder, num_classes: int, in_channels_multiplier: int = 1,
                 embedding_context: int = 1) -> HybridHead:
    head = HybridHead(architecture, encoder, num_classes, in_channels_multiplier, embedding_context)
    return head.to(encoder.device)
