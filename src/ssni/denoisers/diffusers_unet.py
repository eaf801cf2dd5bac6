"""DDPM networks in the diffusers layout, e.g. ``google/ddpm-cifar10-32``, through ``diffusers``.

A diffusers model folder holds ``config.json`` (``"_class_name": "UNet2DModel"``) and
``diffusion_pytorch_model.safetensors`` or ``.bin``; a pipeline folder has them under
``unet/`` with ``scheduler/scheduler_config.json``. We build the network with
``UNet2DModel.from_config`` and load the weights ourselves (safetensors, or ``torch.load``
with ``weights_only=True``), strictly. The noise schedule in the folder must be the DDPM
linear one our purifiers use; anything else is refused rather than silently mixed.

``diffusers`` is optional (``pip install "ssni[diffusers]"``); it does not pull torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from ..weights_io import load_state_dict, match_state_dict
from ..diffusion import VPSchedule
from ..errors import CheckpointError
from .protocol import EpsAdapter

# google/ddpm-cifar10-32 (Ho et al., 2020, converted to diffusers): 35.7M parameters.
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6,
    "norm_num_groups": 32, "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False,
    "mid_block_scale_factor": 1, "time_embedding_type": "positional",
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class DiffusersEps(EpsAdapter):
    """A diffusers ``UNet2DModel`` as an eps model: our level ``t`` (1..T) is diffusers' ``t - 1``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, t - 1).sample


def _unet2d_class():
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise CheckpointError("diffusers-layout models need the diffusers package: "
                              'pip install "ssni[diffusers]"') from err
    return UNet2DModel


def build_diffusers_unet(config: dict | None = None) -> nn.Module:
    """A ``UNet2DModel`` with random weights (default: the ``google/ddpm-cifar10-32`` shape)."""
    return _unet2d_class().from_config(dict(config or DDPM_CIFAR10_CONFIG))


def check_scheduler(path: Path, schedule: VPSchedule = VPSchedule()) -> None:
    """Refuse a scheduler config whose noise schedule or target differs from ``schedule`` (eps, linear)."""
    config = json.loads(path.read_text())
    expected = {"num_train_timesteps": schedule.num_levels, "beta_start": schedule.beta_start,
                "beta_end": schedule.beta_end, "beta_schedule": "linear", "prediction_type": "epsilon"}
    wrong = {k: config[k] for k, v in expected.items() if k in config and config[k] != v}
    if wrong or config.get("trained_betas"):
        raise CheckpointError(f"{path} describes another noise schedule ({wrong or 'trained_betas'}); ssni's "
                              f"purifiers use {expected}")


# Older diffusers checkpoints (google/ddpm-cifar10-32 among them) name the attention projections
# query/key/value/proj_attn; diffusers renames them on load, and so do we.
LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def rename_legacy_attention(state: dict) -> dict:
    """Map old attention parameter names to the current ones (other keys unchanged)."""
    renamed = {}
    for key, value in state.items():
        for old, new in LEGACY_ATTENTION.items():
            if ".attentions." in key and old in key:
                key = key.replace(old, new)
                break
        renamed[key] = value
    return renamed


def load_diffusers_unet(folder: str | Path) -> nn.Module:
    """Load a ``UNet2DModel`` from a diffusers model or pipeline folder, safely and strictly."""
    folder = Path(folder)
    model_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not a diffusers model folder: no config.json (or unet/config.json); "
                              "download the whole repository, e.g. google/ddpm-cifar10-32")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from err
    if config.get("_class_name") != "UNet2DModel":
        raise CheckpointError(f"{config_path} describes a {config.get('_class_name')!r}; only UNet2DModel "
                              "(DDPM-style unconditional UNets) is supported")
    for scheduler in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if scheduler.is_file():
            check_scheduler(scheduler)
    weights = next((model_dir / f for f in WEIGHT_FILES if (model_dir / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has none of {WEIGHT_FILES}")
    unet = build_diffusers_unet(config)
    match_state_dict(unet, rename_legacy_attention(load_state_dict(weights)), str(weights))
    return unet.eval()


__all__ = ["DDPM_CIFAR10_CONFIG", "DiffusersEps", "build_diffusers_unet", "check_scheduler",
           "load_diffusers_unet", "rename_legacy_attention"]
