"""CollaFuse: collaborative diffusion models split at a cut level between a shared server and private clients."""

__version__ = "0.1.0"
