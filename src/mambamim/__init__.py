"""MambaMIM: masked image modeling for CNN + Vision-Mamba networks on 3D medical images."""

__version__ = "0.1.0"

__all__ = ["__version__"]
