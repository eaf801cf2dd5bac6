"""Checks at the public boundary: images are ``[B, C, H, W]`` finite floats in ``[0, 1]``.

The value check (finite, in range) reads back to the host once per call. An attack checks its
images once and runs its passes inside :func:`trusted_images`, where the checks of the defense
it calls keep to shapes and types: its iterates are projections into ``[0, 1]``, valid by
construction, and a read per pass would wait for the device's queue at every step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .errors import InputError

_TRUSTED = [0]  # depth of trusted_images() blocks


@contextlib.contextmanager
def trusted_images() -> Iterator[None]:
    """Inside this block :func:`check_images` checks shapes and types but not values (no host read)."""
    _TRUSTED[0] += 1
    try:
        yield
    finally:
        _TRUSTED[0] -= 1


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
    if _TRUSTED[0]:
        return x
    values = x.detach()  # one read for the three: finite, min, max
    finite, low, high = torch.stack([torch.isfinite(values).all().to(values.dtype), values.min(),
                                     values.max()]).tolist()
    if not finite:
        raise InputError("images contain NaN or Inf values")
    if low < 0 or high > 1:
        raise InputError(f"images must lie in [0, 1], found values in [{low:.3g}, {high:.3g}]; "
                         "undo any normalisation (and divide 0-255 images by 255)")
    return x
