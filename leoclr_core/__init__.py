"""LeOCLR: self-supervised pretraining anchored on the original image (plain-PyTorch core)."""

__version__ = "0.1.0"
