"""samtune: train and adapt the Segment Anything Model with PyTorch Lightning."""

__version__ = "0.1.0"
