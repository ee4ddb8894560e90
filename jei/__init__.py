"""jei-dnn: jointly-learned early exits on frozen backbones."""

__version__ = "0.1.0"
