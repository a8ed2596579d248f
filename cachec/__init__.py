"""cachec: offline calibration and cache-plan compiler for Diffusion Transformers."""

__version__ = "0.1.0"
