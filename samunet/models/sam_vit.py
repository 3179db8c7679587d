"""SAM ViT-B/L/H image encoders, prompt encoders and mask decoders at any input size that is a multiple of 16.

Built with `segment_anything`'s modules (on the meta device, so no time is spent on a random initialisation
that the checkpoint overwrites) and loaded from an official checkpoint. For an input size other than 1024 the
absolute position embedding (64 x 64 grid at 1024) is resized bicubically to the new grid and the relative
position tables of the global-attention blocks (2 * 64 - 1 rows) linearly to 2 * grid - 1 rows, the same
interpolation SAM itself applies to relative positions at run time. Windowed blocks keep their 14 x 14 tables.
"""
from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything import modeling as sam_modeling
from segment_anything.modeling import ImageEncoderViT

from .checkpoints import load_into, load_state_dict, resolve_sam_checkpoint, sha256_file, split_prefixes
from .prompt_parts import build_prompt_parts

PATCH = 16
EMBED_DIM = 256
VIT_CONFIGS = {
    "sam_vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "sam_vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "sam_vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def build_vit(name: str, input_size: int) -> ImageEncoderViT:
    cfg = VIT_CONFIGS[name]
    return ImageEncoderViT(
        img_size=input_size, patch_size=PATCH, in_chans=3, embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=4.0, out_chans=EMBED_DIM, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_abs_pos=True, use_rel_pos=True,
        rel_pos_zero_init=True, window_size=14, global_attn_indexes=cfg["global_attn_indexes"])


def resize_abs_pos(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, H, W, C) position embedding to (1, grid, grid, C), bicubic."""
    if pos.shape[1] == grid and pos.shape[2] == grid:
        return pos
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic",
                            align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos.dtype).contiguous()


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) relative position table to (length, C), linear."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t()[None].float(), size=length, mode="linear")
    return resized[0].t().to(table.dtype).contiguous()


def adapt_encoder_state(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Resize position tables of an image-encoder state dict to the shapes `encoder` was built with."""
    expected = encoder.state_dict()
    adapted = dict(state)
    for key, value in state.items():
        if key not in expected or tuple(value.shape) == tuple(expected[key].shape):
            continue
        target = expected[key].shape
        if key == "pos_embed" and value.ndim == 4 and value.shape[-1] == target[-1]:
            adapted[key] = resize_abs_pos(value, target[1])
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == target[1]:
            adapted[key] = resize_rel_pos(value, target[0])
    return adapted


def build_sam_parts(name: str, input_size: int, checkpoint: str | os.PathLike | None = None) -> dict:
    path = resolve_sam_checkpoint(name, checkpoint)
    what = {"sam_vit_b": "SAM ViT-B", "sam_vit_l": "SAM ViT-L", "sam_vit_h": "SAM ViT-H"}[name]
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path, what).items()}
    parts = split_prefixes(state, ("image_encoder", "prompt_encoder", "mask_decoder"), str(path), what)
    with torch.device("meta"):
        backbone = build_vit(name, input_size)
        prompt_encoder, mask_decoder = build_prompt_parts(sam_modeling, input_size, input_size // PATCH)
    encoder_state = adapt_encoder_state(parts["image_encoder"], backbone)
    load_into(backbone, encoder_state, str(path), f"the {what} image encoder", assign=True)
    load_into(prompt_encoder, parts["prompt_encoder"], str(path), f"the {what} prompt encoder", assign=True)
    load_into(mask_decoder, parts["mask_decoder"], str(path), f"the {what} mask decoder", assign=True)
    return dict(backbone=backbone.eval(), prompt_encoder=prompt_encoder.eval(), mask_decoder=mask_decoder.eval(),
                weights_sha256=sha256_file(path), weights_source=str(path.resolve()), stride=PATCH)
