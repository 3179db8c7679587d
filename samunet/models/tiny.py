"""`test_tiny`: a small encoder with seeded random weights, for fast tests of everything around the encoder.

Same interface as the real encoders (stride 4, 32 channels, a SAM-style prompt encoder and mask decoder of
width 32), so heads, caches and the prompted path can be exercised in milliseconds. The weights are a pure
function of the seed; they are not pretrained and the encoder is never chosen automatically.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from .checkpoints import sha256_state_dict

EMBED_DIM = 32
STRIDE = 4
SEED = 20240601


class TinyBackbone(nn.Module):
    def __init__(self, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, embed_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_tiny_parts(input_size: int, seed: int = SEED) -> dict:
    grid = input_size // STRIDE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = TinyBackbone()
        prompt_encoder = PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(grid, grid),
                                       input_image_size=(input_size, input_size), mask_in_chans=8)
        mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=64, num_heads=2),
            transformer_dim=EMBED_DIM, iou_head_depth=2, iou_head_hidden_dim=32)
    state = {f"image_encoder.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()})
    state.update({f"mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()})
    return dict(backbone=backbone.eval(), prompt_encoder=prompt_encoder.eval(), mask_decoder=mask_decoder.eval(),
                weights_sha256=sha256_state_dict(state), weights_source=f"seeded-random:{seed}", stride=STRIDE)
