"""diffusers-layout folders (google/ddpm-cifar10-32): load through the registry, legacy names, refusals.

Skipped, with the reason, when the optional ``diffusers`` extra is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssni.checkpoints.public import PUBLIC, load_public
from ssni.errors import CheckpointError

diffusers = pytest.importorskip("diffusers")
TINY_DIFFUSERS = {"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 3,
                  "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "freq_shift": 1, "flip_sin_to_cos": False}


def _diffusers_folder(tmp_path: Path, safe: bool = True, scheduler: dict | None = None) -> tuple[Path, object]:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel.from_config(TINY_DIFFUSERS).eval()
    folder = tmp_path / "ddpm-cifar10-32"
    unet.save_pretrained(folder, safe_serialization=safe)
    diffusers.DDPMScheduler(**(scheduler or {})).save_pretrained(folder / "scheduler")
    return folder, unet


@pytest.mark.parametrize("safe", [True, False])
def test_a_diffusers_folder_loads_through_the_registry_with_shifted_timesteps(tmp_path, safe):
    folder, unet = _diffusers_folder(tmp_path, safe)
    model = load_public("cifar10-ddpm-diffusers", tmp_path)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 1000])
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t - 1).sample)
    assert PUBLIC["cifar10-ddpm-diffusers"].file == folder.name


def test_a_diffusers_folder_with_legacy_attention_names_loads(tmp_path):
    folder, unet = _diffusers_folder(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    legacy = {}
    for key, value in unet.state_dict().items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, old)
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    torch.save(legacy, folder / "diffusion_pytorch_model.bin")
    model = load_public("cifar10-ddpm-diffusers", tmp_path)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t - 1).sample)


def test_the_default_diffusers_shape_is_ddpm_cifar10():
    with torch.device("meta"):
        net = PUBLIC["cifar10-ddpm-diffusers"].build()
    assert sum(p.numel() for p in net.parameters()) == 35_746_307  # DDPM's 35.7M CIFAR-10 model


def test_diffusers_folders_with_another_schedule_or_missing_weights_are_refused(tmp_path):
    folder, _ = _diffusers_folder(tmp_path, scheduler={"beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(CheckpointError, match="another noise schedule"):
        load_public("cifar10-ddpm-diffusers", tmp_path)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has none of"):
        load_public("cifar10-ddpm-diffusers", tmp_path)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="UNet2DModel"):
        load_public("cifar10-ddpm-diffusers", tmp_path)
