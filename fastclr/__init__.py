"""fastclr: large-batch SimCLR pretraining."""

__version__ = "0.1.0"
