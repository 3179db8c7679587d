"""samunet: self-configuring frozen-SAM segmentation for medical images, in the manner of nnU-Net."""
__version__ = "0.1.0"
