"""Classifiers take images in [0, 1] and return logits; normalisation lives inside."""

from .small_cnn import SmallCNN, SmallCNNConfig

__all__ = ["SmallCNN", "SmallCNNConfig"]
