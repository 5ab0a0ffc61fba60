"""mae-scale: pretraining video Masked Autoencoders (MAE-ST) from a laptop CPU to many GPU nodes."""

__version__ = "0.1.0"
