"""Zero-shot, prompted segmentation with an encoder's own pretrained prompt encoder and mask decoder.

    segmenter = PromptedSegmenter(encoder)
    out = segmenter(images=images, boxes=boxes)            # or embeddings=encoder(images)
    out.masks       # (B, M, S, S) mask logits at the encoder's input size (threshold at 0)
    out.iou         # (B, M) predicted IoU
    out.low_res     # (B, M, 4g, 4g) logits to feed back as `mask_input` for the next interaction

Prompts are in the pixel coordinates of the encoder's S x S input, x before y (SAM's convention):
point_coords (B, N, 2) with point_labels (B, N) (1 foreground, 0 background, -1 padding); boxes (B, 4) as
x0, y0, x1, y1; mask_input (B, 1, 4g, 4g) low-resolution logits of a previous prediction. M is 1, or 3 with
multimask_output=True. Works for every encoder of the registry (test_tiny's decoder is random).

By default the segmenter uses the encoder's own pretrained prompt encoder and mask decoder; a fine-tuned pair
(``samunet_finetune_prompted``) is passed as ``PromptedSegmenter(encoder, prompt_encoder, mask_decoder)``, and
``trainable_copy(encoder)`` gives the pair to fine-tune. ``decode_each`` is the differentiable path for training:
one image embedding per prompt.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from samunet.models.token_attention import decode_masks


@dataclass
class PromptedOutput:
    masks: torch.Tensor
    iou: torch.Tensor
    low_res: torch.Tensor


def trainable_copy(encoder) -> tuple[nn.Module, nn.Module]:
    """Copies of the encoder's pretrained prompt encoder and mask decoder, with gradients switched on."""
    if encoder.prompt_encoder is None or encoder.mask_decoder is None:
        raise ValueError(f"encoder '{encoder.name}' has no prompt encoder / mask decoder")
    parts = copy.deepcopy(encoder.prompt_encoder), copy.deepcopy(encoder.mask_decoder)
    for module in parts:
        module.requires_grad_(True)
    return parts


class PromptedSegmenter(nn.Module):
    def __init__(self, encoder, prompt_encoder: nn.Module | None = None, mask_decoder: nn.Module | None = None):
        super().__init__()
        if encoder.prompt_encoder is None or encoder.mask_decoder is None:
            raise ValueError(f"encoder '{encoder.name}' has no prompt encoder / mask decoder")
        self.encoder = encoder
        self.prompt_encoder = prompt_encoder if prompt_encoder is not None else encoder.prompt_encoder
        self.mask_decoder = mask_decoder if mask_decoder is not None else encoder.mask_decoder
        self.input_size = encoder.input_size
        self.low_res_size = 4 * encoder.grid_size

    def _batch_size(self, embeddings, point_coords, boxes, mask_input) -> int:
        for t in (embeddings, point_coords, boxes, mask_input):
            if t is not None:
                return t.shape[0]
        raise ValueError("give images or embeddings")

    def _prompt_tensors(self, n: int, name: str, device, point_coords, point_labels, boxes, mask_input):
        """Prompts of ``n`` items as tensors on ``device`` in the shapes the prompt encoder takes; ``name`` is the
        batch axis as the caller's error messages call it."""
        if point_coords is not None:
            point_coords = torch.as_tensor(point_coords, dtype=torch.float32, device=device).reshape(n, -1, 2)
            point_labels = torch.as_tensor(point_labels, device=device).reshape(n, -1).to(torch.int64)
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(n, 4)
        if mask_input is not None:
            mask_input = torch.as_tensor(mask_input, dtype=torch.float32, device=device)
            if tuple(mask_input.shape) != (n, 1, self.low_res_size, self.low_res_size):
                raise ValueError(f"mask_input must be ({name}, 1, {self.low_res_size}, {self.low_res_size}), "
                                 f"got {tuple(mask_input.shape)}")
        return point_coords, point_labels, boxes, mask_input

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor | None = None, images: torch.Tensor | None = None,
                point_coords: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None,
                multimask_output: bool = False) -> PromptedOutput:
        if embeddings is None:
            if images is None:
                raise ValueError("give images or embeddings")
            embeddings = self.encoder(images)
        expected = self.encoder.embedding_shape
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:]) != expected:
            raise ValueError(f"embeddings must be (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(embeddings.shape)}")
        if point_coords is None and boxes is None and mask_input is None:
            raise ValueError("give at least one prompt: points, a box or a mask")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels go together")
        return self._decode(embeddings, embeddings.shape[0], "B", point_coords, point_labels, boxes, mask_input,
                            multimask_output)

    @torch.no_grad()
    def predict_prompts(self, embedding: torch.Tensor, point_coords: torch.Tensor | None = None,
                        point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                        mask_input: torch.Tensor | None = None, multimask_output: bool = False,
                        chunk_size: int = 16) -> PromptedOutput:
        """Many prompts on ONE image: ``embedding`` (1, C, g, g) is shared by N prompts batched along the first
        axis (point_coords (N, n, 2), boxes (N, 4), mask_input (N, 1, 4g, 4g)), decoded ``chunk_size`` at a
        time. Same outputs as ``forward`` with the embedding repeated N times, without repeating the encoder."""
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"embedding must be (1, C, g, g), got {tuple(embedding.shape)}")
        n = self._batch_size(None, point_coords, boxes, mask_input)
        masks, ious, lows = [], [], []
        for a in range(0, n, chunk_size):
            sl = slice(a, min(n, a + chunk_size))
            m = sl.stop - sl.start
            out = self._decode(
                embedding, m, "N",
                None if point_coords is None else point_coords[sl], None if point_labels is None else point_labels[sl],
                None if boxes is None else boxes[sl], None if mask_input is None else mask_input[sl],
                multimask_output)
            masks.append(out.masks)
            ious.append(out.iou)
            lows.append(out.low_res)
        return PromptedOutput(masks=torch.cat(masks), iou=torch.cat(ious), low_res=torch.cat(lows))

    def _decode(self, embeddings, n, name, point_coords, point_labels, boxes, mask_input, multimask_output):
        """``n`` prompts, prompt i on embedding i (or all on one shared (1, C, g, g) embedding), in one pass;
        ``name`` is the batch axis as the caller's error messages call it."""
        point_coords, point_labels, boxes, mask_input = self._prompt_tensors(
            n, name, embeddings.device, point_coords, point_labels, boxes, mask_input)
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low, iou = decode_masks(self.mask_decoder, embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                                multimask_output)
        full = low if low.shape[-1] == self.input_size else \
            F.interpolate(low, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return PromptedOutput(masks=full, iou=iou, low_res=low)

    def decode_each(self, embeddings: torch.Tensor, point_coords: torch.Tensor | None = None,
                    point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                    mask_input: torch.Tensor | None = None, multimask_output: bool = False) -> PromptedOutput:
        """N prompts on N images, with gradients: ``embeddings`` (N, C, g, g), prompt i on image i, in the shapes
        of ``predict_prompts``. All pairs are decoded in one pass (``decode_masks``; segment_anything's decoder
        would pair one image with all prompts of that image)."""
        return self._decode(embeddings, embeddings.shape[0], "N", point_coords, point_labels, boxes, mask_input,
                            multimask_output)
