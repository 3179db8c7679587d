"""Interactive segmentation of one image: encode it once, then answer every click in milliseconds.

    seg = InteractiveSegmenter.from_plans(4, "2d", decoder="samunet_results/.../samunetPromptedTrainer__...__2d",
                                          fold=0)
    seg.set_image(slice_2d)                       # (Y, X) or (3, Y, X) in [0, 1]: the encoder runs here, once
    r = seg.predict(box=[x0, y0, x1, y1])         # r.mask (Y, X) bool, r.iou predicted IoU, r.logits (1, L, L)
    r = seg.predict(points=[[x, y]], labels=[0], box=[x0, y0, x1, y1], mask=r)   # correct it with a click
    r = seg.predict(box=..., mask=probabilities)  # start from a model's prediction (Y, X) in [0, 1]

Coordinates are the image's own pixels, x before y; a box is (x0, y0, x1, y1) with its first and last pixel
(inclusive). ``mask`` is either an earlier result (its low-resolution logits are fed back, as SAM does) or a
(Y, X) mask or probability map. Images of any size are handled as the zero-shot suite does: the longest side is
resized to the encoder's input and the rest padded, so a prompt gives the same mask here as there. Without a
``decoder`` the encoder's own pretrained prompt encoder and mask decoder answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from samunet.models.prompted import PromptedSegmenter
from samunet.preprocessing.encoder_inputs import encoder_inputs, make_layout
from samunet.preprocessing.prompt_geometry import SliceGeometry


@dataclass
class InteractiveResult:
    mask: np.ndarray          # (Y, X) bool
    iou: float                # the decoder's predicted IoU
    logits: torch.Tensor      # (1, L, L) low-resolution logits, to feed back as ``mask``


class InteractiveSegmenter:
    def __init__(self, encoder, segmenter: PromptedSegmenter | None = None):
        self.encoder = encoder
        self.segmenter = segmenter if segmenter is not None else PromptedSegmenter(encoder)
        self.embedding = self.geometry = None

    @classmethod
    def from_plans(cls, dataset, configuration: str = "2d", decoder=None, fold=None, device: str = "cpu"):
        """The plans' encoder at the plans' input size, with the fine-tuned decoder at ``decoder`` if given."""
        from samunet.inference.prompted_decoder import load_decoder
        from samunet.models.for_plans import build_encoder_for_plans, resolve_device
        from samunet.paths import resolve_dataset_name
        from samunet.planning.plans import get_configuration, load_plans
        plans = load_plans(resolve_dataset_name(dataset))
        encoder = build_encoder_for_plans(plans, get_configuration(plans, configuration), resolve_device(device))
        return cls(encoder, None if decoder is None else load_decoder(decoder, encoder, fold)[0])

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """Encode ``image`` ((Y, X) or (3, Y, X), values in [0, 1]) once for all following predictions."""
        img = np.asarray(image, np.float32)
        img = np.repeat(img[None], 3, 0) if img.ndim == 2 else img
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image must be (Y, X) or (3, Y, X), got {tuple(np.shape(image))}")
        layout = make_layout(img.shape[1:], {"encoder_input_size": self.encoder.input_size, "inplane_mode": "resize"})
        x = encoder_inputs(img[None], layout)[0].to(self.encoder.device)
        self.set_embedding(self.encoder(x).float(), layout)

    def set_embedding(self, embedding: torch.Tensor, layout: dict) -> None:
        """Use an embedding computed elsewhere ((1, C, g, g), e.g. from the cache) with its ``make_layout``."""
        self.embedding = embedding
        self.geometry = SliceGeometry(layout, self.segmenter.low_res_size)

    @torch.no_grad()
    def predict(self, points=None, labels=None, box=None, mask=None) -> InteractiveResult:
        if self.embedding is None:
            raise RuntimeError("call set_image first")
        g = self.geometry
        coords = None if points is None else g.points(np.asarray(points, np.float64).reshape(1, -1, 2))
        labs = None if labels is None else torch.as_tensor(np.asarray(labels).reshape(1, -1), dtype=torch.int64)
        boxes = None if box is None else g.boxes(np.asarray(box, np.float64).reshape(1, 4))
        if isinstance(mask, InteractiveResult):
            mask_input = mask.logits[None]
        elif mask is not None:
            mask_input = g.mask_prompt(np.asarray(mask, np.float32)[None])
        else:
            mask_input = None
        if mask_input is not None:
            mask_input = mask_input.to(self.embedding.device)
        out = self.segmenter.predict_prompts(self.embedding, coords, labs, boxes, mask_input)
        low = out.low_res[:, :1]
        return InteractiveResult(mask=(g.logits_to_slice(low)[0, 0] > 0).numpy(), iou=float(out.iou[0, 0]),
                                 logits=low[0])
