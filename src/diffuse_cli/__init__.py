"""diffuse: train and sample denoising diffusion probabilistic models from the command line."""

__version__ = "0.1.0"
