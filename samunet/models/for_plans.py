"""Models for a plan: the device, the plan's frozen encoder, and every trainable model built by one function.

Training, prediction and the zero-shot comparison all build their models here, so a checkpoint is rebuilt
exactly as it was trained:

    device = resolve_device("auto")
    encoder = build_encoder_for_plans(plans, plans["configurations"]["2d"], device)
    model = build_model("hybrid", encoder, num_classes=3, hybrid_architecture=config["hybrid"])
    model = model_from_state(checkpoint_state, encoder)      # the same, with the trained weights loaded
"""
from __future__ import annotations

import torch

from samunet.models.specs import HYBRID_HEADS, IMAGE_MODELS
from samunet.utils import SamunetError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SamunetError("--device cuda was asked for, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise SamunetError(f"unknown device '{device}' (use auto, cpu or cuda)")
    return torch.device(device)


def build_encoder_for_plans(plans: dict, config: dict, device):
    from samunet.models.encoders import build_encoder
    enc = plans["encoder"]
    return build_encoder(enc["name"], checkpoint=enc.get("checkpoint"), input_size=config["encoder_input_size"],
                         device=device, optimise=cpu_precision(plans, device))


def cpu_precision(plans: dict, device) -> str | bool:
    """The encoder path for ``device``: on the CPU the plans' ``cpu_precision`` (plans without one: the fast
    float32 path, numerically the shipped network), elsewhere the network as built."""
    if torch.device(device).type != "cpu":
        return False
    return plans["encoder"].get("cpu_precision", "fp32")


def build_model(head: str, encoder, num_classes: int, in_channels_multiplier: int = 1, embedding_context: int = 1,
                unet_architecture: dict | None = None, hybrid_architecture: dict | None = None) -> torch.nn.Module:
    """The untrained model ``head``: a head on the embeddings, the hybrid head or the from-scratch U-Net.

    ``in_channels_multiplier``: channels encoded separately (k); ``embedding_context``: cached embeddings of
    neighbouring slices a head fuses (3 for ``2.5d_emb``). The U-Net needs no encoder (``encoder`` may be None).
    """
    if head in IMAGE_MODELS:
        from samunet.models.unet import build_unet
        return build_unet(unet_architecture, 3 * in_channels_multiplier, num_classes)
    if head in HYBRID_HEADS:
        from samunet.models.hybrid import build_hybrid
        return build_hybrid(hybrid_architecture, encoder, num_classes, in_channels_multiplier, embedding_context)
    from samunet.models.heads import build_head
    return build_head(head, encoder, num_classes, in_channels_multiplier=in_channels_multiplier * embedding_context)


def model_from_state(state: dict, encoder) -> torch.nn.Module:
    """The trained model a samunet checkpoint holds (``load_checkpoint``), on ``encoder``'s embeddings."""
    model = build_model(state["head"], encoder, len(state["label_values"]), int(state["in_channels_multiplier"]),
                        int(state.get("embedding_context", 1)), state.get("unet_architecture"),
                        state.get("hybrid_architecture"))
    model.load_state_dict(state["head_state"])
    return model
