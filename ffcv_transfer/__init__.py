"""ffcv-transfer: train many source models on class subsets, transfer, and measure influence."""

__version__ = "0.1.0"
