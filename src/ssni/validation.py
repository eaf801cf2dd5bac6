"""Checks at the public boundary: images are ``[B, C, H, W]`` finite floats in ``[0, 1]``."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError


def check_images(x: Tensor, channels: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """Return ``x`` if it is a non-empty ``[B, C, H, W]`` float batch in ``[0, 1]``, else raise.

    Args:
        x: the batch to check.
        channels: the channel count the models expect, if known.
        size: the ``(H, W)`` the models expect, if known.
    """
    if not isinstance(x, Tensor):
        raise InputError(f"images must be a torch.Tensor [B, C, H, W], found {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"images must have shape [B, C, H, W], found shape {tuple(x.shape)}; "
                         "add a batch dimension with x[None] for a single image")
    if x.numel() == 0:
        raise InputError(f"the image batch is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise InputError(f"images must be floats in [0, 1], found dtype {x.dtype}; divide uint8 by 255")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"the models expect {channels} channel(s), found {x.shape[1]}")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise InputError(f"the models expect {size[0]}x{size[1]} images, found "
                         f"{x.shape[-2]}x{x.shape[-1]}")
    if not bool(torch.isfinite(x.detach()).all()):
        raise InputError("images contain NaN or Inf values")
    low, high = float(x.detach().min()), float(x.detach().max())
    if low < 0 or high > 1:
        raise InputError(f"images must lie in [0, 1], found values in [{low:.3g}, {high:.3g}]; "
                         "undo any normalisation (and divide 0-255 images by 255)")
    return x
