"""Diffusion networks behind one protocol: ``model(x_t, t) -> eps_hat``."""

from .protocol import CountingModel, EDMAdapter, EpsModel, eps_to_score, eps_to_x0
from .unet import UNet, UNetConfig

__all__ = ["CountingModel", "EDMAdapter", "EpsModel", "UNet", "UNetConfig", "eps_to_score", "eps_to_x0"]
