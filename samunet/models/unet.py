"""A 2D U-Net trained from scratch on the slice: the no-pretraining baseline for the frozen-encoder heads.

    model = build_unet(plans_config["unet"], in_channels=3, num_classes=3)
    logits = model(images)         # (B, in_channels, Q, Q)  ->  (B, num_classes, Q, Q)

It is dynamic-network-architectures' ``PlainConvUNet`` configured the way nnU-Net configures its 2d U-Net, for a
Q x Q canvas (``canvas_block``): the slice laid out exactly as on the encoder input (longest side scaled to the
canvas, top-left, zero padding), with Q the median slice extent at the target spacing rounded up to a multiple of
16 and capped at the encoder input P. The U-Net thus works at about the data's own resolution, as nnU-Net does,
and is the hybrid head's image path without the frozen embedding: the two differ only by SAM's features. (Plans
written before the canvas existed have no ``canvas_size``: their U-Net reads the P x P encoder input.) The model
reads images, not embeddings (``takes_images``), so no encoder is built or run for it; the input has ``n_enc x 3``
channels in [0, 1] (replicated grey channels stay replicated).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

UNET_MIN_FEATURE_MAP = 4    # nnU-Net: stop pooling an axis once halving it would go below 4 px
UNET_BASE_FEATURES = 32
UNET_MAX_FEATURES_2D = 512
UNET_CONVS_PER_STAGE = 2
UNET_KERNEL = 3
CANVAS_MULTIPLE = 16


def unet_block(patch_size) -> dict:
    """nnU-Net's 2d topology rule for a ``patch_size`` input, with the reason written out."""
    size = [int(s) for s in patch_size]
    strides = [[1, 1]]
    shapes = [list(size)]
    while True:
        step = [2 if s >= 2 * UNET_MIN_FEATURE_MAP and s % 2 == 0 else 1 for s in size]
        if step == [1, 1]:
            break
        size = [s // k for s, k in zip(size, step)]
        strides.append(step)
        shapes.append(list(size))
    n = len(strides)
    features = [min(UNET_BASE_FEATURES * 2 ** i, UNET_MAX_FEATURES_2D) for i in range(n)]
    return {
        "n_stages": n,
        "features_per_stage": features,
        "strides": strides,
        "kernel_sizes": [[UNET_KERNEL, UNET_KERNEL]] * n,
        "n_conv_per_stage": [UNET_CONVS_PER_STAGE] * n,
        "n_conv_per_stage_decoder": [UNET_CONVS_PER_STAGE] * (n - 1),
        "feature_map_sizes": shapes,
        "unet_reason": (f"nnU-Net's 2d rule for the {patch_size[0]}x{patch_size[1]} px input: halve each axis while "
                        f"it stays >= {UNET_MIN_FEATURE_MAP} px ({' -> '.join(str(s[0]) for s in shapes)} px, "
                        f"{n} stages), {UNET_BASE_FEATURES} features doubling per stage capped at "
                        f"{UNET_MAX_FEATURES_2D}, {UNET_CONVS_PER_STAGE} convolutions of {UNET_KERNEL}x{UNET_KERNEL} "
                        "per stage, instance norm and leaky ReLU; trained from scratch with SGD (Nesterov "
                        "momentum 0.99, weight decay 3e-5, poly learning rate)"),
    }


def canvas_size(config: dict) -> tuple[int, str]:
    """The side Q of the canvas on which the image models (the U-Net, the hybrid head's image path) read a slice
    of a planned configuration, with its reason."""
    p = int(config["encoder_input_size"])
    if config["inplane_mode"] != "resize":
        return p, (f"sliding-window tiles are already at the target spacing: the canvas is the {p} px tile, "
                   "aligned with the encoder's")
    extent = float(max(config["median_slice_shape"]))
    q = int(min(p, max(CANVAS_MULTIPLE * 2, math.ceil(extent / CANVAS_MULTIPLE) * CANVAS_MULTIPLE)))
    return q, (f"median slice extent {extent:.0f} px at the target spacing, rounded up to a multiple of "
               f"{CANVAS_MULTIPLE} and capped at the {p} px encoder input: the image path works at about the data's "
               f"own resolution ({(q / p) ** 2:.2f}x the pixels of the encoder input)")


def canvas_block(config: dict) -> dict:
    """A plans block for an image model: the canvas size and nnU-Net's 2d topology for it."""
    q, reason = canvas_size(config)
    block = unet_block([q, q])
    block["canvas_size"] = q
    block["canvas_reason"] = reason
    return block


class UNetModel(nn.Module):
    """``PlainConvUNet`` taking ``(B, C, Q, Q)`` images on its canvas (``input_size``; None: the encoder input)."""

    takes_images = True

    def __init__(self, architecture: dict, in_channels: int, num_classes: int):
        super().__init__()
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        self.architecture = {k: v for k, v in architecture.items() if not k.endswith("reason")}
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        a = self.architecture
        self.input_size = int(a["canvas_size"]) if a.get("canvas_size") else None
        self.net = PlainConvUNet(
            input_channels=self.in_channels, n_stages=a["n_stages"], features_per_stage=a["features_per_stage"],
            conv_op=nn.Conv2d, kernel_sizes=a["kernel_sizes"], strides=a["strides"],
            n_conv_per_stage=a["n_conv_per_stage"], num_classes=self.num_classes,
            n_conv_per_stage_decoder=a["n_conv_per_stage_decoder"], conv_bias=True,
            norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
        self.net.apply(_init_weights)
        self.set_deep_supervision(bool(a.get("deep_supervision", False)))

    def set_deep_supervision(self, enabled: bool) -> None:
        """Train every decoder stage's output (used in training only: see forward), or only the last."""
        self.deep_supervision = enabled
        train_only_used_outputs(self.net.decoder, enabled)

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits (B, num_classes, Q, Q); in training with the block's ``deep_supervision``, those of every
        decoder stage, highest resolution first."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"UNetModel expects images of shape (B, {self.in_channels}, P, P), "
                             f"got {tuple(images.shape)}")
        self.net.decoder.deep_supervision = self.deep_supervision and self.training
        return self.net(images)


def train_only_used_outputs(decoder: nn.Module, deep_supervision: bool) -> None:
    """Let only the output convolutions that the loss reaches require gradients: dynamic-network-architectures
    builds one per decoder stage (lowest resolution first) either way; without deep supervision only the last one is
    used, with it all but the lowest (nnU-Net weights it 0). DistributedDataParallel refuses a parameter that gets no
    gradient; the state dict stays the same."""
    n = len(decoder.seg_layers)
    for i, layer in enumerate(decoder.seg_layers):
        layer.requires_grad_(i == n - 1 or (deep_supervision and i > 0))


def _init_weights(module: nn.Module) -> None:
    # nnU-Net's InitWeights_He(1e-2): Kaiming-normal weights for leaky ReLU, zero biases
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_unet(architecture: dict, in_channels: int, num_classes: int) -> UNetModel:
    return UNetModel(architecture, in_channels, num_classes)
