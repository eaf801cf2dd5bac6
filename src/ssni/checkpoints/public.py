"""Public checkpoints of the field, as data: file, source, license, architecture and loader.

The files are not shipped: ``ssni fetch NAME --weights-dir DIR`` downloads those
with a direct ``download`` URL (resumable, hash-checked where ``sha256`` is known);
the others are fetched by hand from ``url`` into that folder. Each loader builds our own
re-implementation of the published architecture and loads the file strictly,
without unpickling code (``allow_pickle`` is an explicit opt-in). ``build``
gives the same architecture with random weights, for dry runs.
``sha256`` is ``None`` where we could not download the file to pin it; the
strict key/shape check still refuses any file of another layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..classifiers.resnet import (autoattack_resnet18, find_autoattack_checkpoint, load_autoattack_resnet18,
                                  load_torchvision_resnet, torchvision_resnet)
from ..classifiers.wideresnet import (DMWideResNet, DMWideResNetConfig, WideResNet, WideResNetConfig,
                                      load_dm_wideresnet, load_paper_wrn_70_16, load_wideresnet,
                                      paper_wrn_70_16_config)
from ..denoisers.diffusers_unet import DiffusersEps, build_diffusers_unet, load_diffusers_unet
from ..denoisers.edm import EDMDenoiser
from ..denoisers.guided_diffusion import (GuidedDiffusionConfig, GuidedDiffusionEps, GuidedDiffusionUNet,
                                          load_guided_diffusion)
from ..denoisers.protocol import EDMAdapter
from ..denoisers.score_sde import ScoreSDEEps, ScoreSDENet, load_score_sde
from ..errors import CheckpointError
from ..weights_io import file_sha256
from .edm_files import load_edm


@dataclass(frozen=True)
class PublicModel:
    kind: str  # "diffusion" (speaks the eps protocol) or "classifier" ([0, 1] in, logits out)
    file: str
    size: str
    url: str
    license: str
    format: str
    resolution: int
    load: Callable[[Path, bool], nn.Module]
    build: Callable[[], nn.Module]
    sha256: str | None = None
    alternatives: tuple[str, ...] = ()  # other accepted file names (e.g. the unconverted original)
    download: str | None = None  # a direct URL `ssni fetch` can get (saved under its own base name)
    locate: Callable[[], Path | None] | None = None  # where else the file may already be (an installed package)


PUBLIC: dict[str, PublicModel] = {
    "cifar10-ddpmpp-deep-vp": PublicModel(
        "diffusion", "checkpoint_8.pth", "~1.3 GB (106.6M parameters, EMA + model + optimizer)",
        "score_sde_pytorch release, folder vp/cifar10_ddpmpp_deep_continuous (as used by DiffPure)",
        "Apache-2.0", "score-SDE checkpoint dict {'model' (DataParallel keys, sigmas buffer first), "
        "'ema':{'shadow_params': one tensor per parameter},'optimizer','step'}", 32,
        lambda path, pickle: ScoreSDEEps(load_score_sde(path, allow_pickle=pickle)),
        lambda: ScoreSDEEps(ScoreSDENet())),
    "cifar10-edm-uncond-vp": PublicModel(
        "diffusion", "edm-cifar10-32x32-uncond-vp.safetensors",
        "~224 MB converted (55.7M parameters); the .pkl also holds the training state",
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl, then "
        "`ssni convert edm-cifar10-32x32-uncond-vp.pkl --allow-pickle`", "CC BY-NC-SA 4.0",
        "EDM VPPrecond(SongUNet DDPM++) converted by `ssni convert` (the .pkl loads with --allow-pickle)", 32,
        lambda path, pickle: EDMAdapter(load_edm(path, allow_pickle=pickle)), lambda: EDMAdapter(EDMDenoiser()),
        alternatives=("edm-cifar10-32x32-uncond-vp.pkl",),
        download="https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl"),
    "cifar10-ddpm-diffusers": PublicModel(
        "diffusion", "ddpm-cifar10-32", "~143 MB folder (35.7M parameters)",
        "https://huggingface.co/google/ddpm-cifar10-32 (the whole repository as a folder; needs "
        '`pip install "ssni[diffusers]"`)', "Apache-2.0",
        "diffusers UNet2DModel folder: config.json + diffusion_pytorch_model.safetensors or .bin", 32,
        lambda path, pickle: DiffusersEps(load_diffusers_unet(path)),
        lambda: DiffusersEps(build_diffusers_unet())),
    "imagenet-256-uncond": PublicModel(
        "diffusion", "256x256_diffusion_uncond.pt", "~2.2 GB (552.8M parameters)",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
        "MIT", "guided-diffusion UNetModel state dict (learned sigma, 6 output channels)", 256,
        lambda path, pickle: GuidedDiffusionEps(load_guided_diffusion(path, allow_pickle=pickle)),
        lambda: GuidedDiffusionEps(GuidedDiffusionUNet(GuidedDiffusionConfig())),
        download="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"),
    "cifar10-wrn-28-10": PublicModel(
        "classifier", "Standard.pt", "~146 MB (36.5M parameters)",
        "RobustBench model zoo: cifar10 / Linf / Standard", "MIT (RobustBench)",
        "RobustBench state dict (optionally under 'state_dict', 'module.' prefix)", 32,
        lambda path, pickle: load_wideresnet(path, allow_pickle=pickle), lambda: WideResNet(WideResNetConfig())),
    # The paper's classifier: the *standard* (not adversarially trained) WRN-70-16 with dropout that
    # DiffPure and the SSNI authors evaluate (their `WideResNet_70_16_dropout`, loaded from
    # pretrained/cifar10/wrn-70-16-dropout/weights.pt with the 7-character `module.` prefix removed).
    "cifar10-wrn-70-16": PublicModel(
        "classifier", "wrn-70-16-dropout/weights.pt", "~1.07 GB (266.8M parameters)",
        "DiffPure README, 'wrn-70-16-dropout on CIFAR-10': https://drive.google.com/drive/folders/"
        "1istqcnPNXJ-TQFdxRqNJuInzOtlYOG1b (keep the folder: <weights-dir>/wrn-70-16-dropout/weights.pt)",
        "NVIDIA Source Code License for DiffPure (non-commercial research and evaluation)",
        "state dict of the TRADES-style WideResNet (depth 70, widen 16, dropout 0.3), every key under "
        "'module.'; CIFAR-10 mean/std applied inside, not stored", 32,
        lambda path, pickle: load_paper_wrn_70_16(path, allow_pickle=pickle),
        lambda: WideResNet(paper_wrn_70_16_config()),
        alternatives=("wrn-70-16-dropout.pt",)),
    "cifar10-wrn-70-16-gowal2020": PublicModel(
        "classifier", "Gowal2020Uncovering_70_16_extra.pt", "~1.07 GB (266.8M parameters)",
        "RobustBench model zoo: cifar10 / Linf / Gowal2020Uncovering_70_16_extra (adversarially trained; "
        "`robustbench.utils.load_model` downloads it to models/cifar10/Linf/)", "see RobustBench entry",
        "RobustBench DMWideResNet state dict (mean/std are non-persistent buffers, not in the file)", 32,
        lambda path, pickle: load_dm_wideresnet(path, allow_pickle=pickle),
        lambda: DMWideResNet(DMWideResNetConfig())),
    "imagenet-resnet50": PublicModel(
        "classifier", "resnet50-0676ba61.pth", "~98 MB (25.6M parameters)",
        "https://download.pytorch.org/models/resnet50-0676ba61.pth (torchvision IMAGENET1K_V1)", "BSD-3-Clause",
        "torchvision ResNet state dict (ImageNet normalisation applied inside ours)", 224,
        lambda path, pickle: load_torchvision_resnet(path, allow_pickle=pickle), lambda: torchvision_resnet(),
        download="https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "cifar10-resnet18-autoattack": PublicModel(
        "classifier", "model_test.pt", "44,754,497 bytes (11.2M parameters)",
        "shipped inside the PyPI package pyautoattack 0.2.0 (pyautoattack/examples/model_test.pt)", "MIT",
        "plain state dict, legacy torch serialisation, [0, 1] inputs", 32,
        lambda path, pickle: load_autoattack_resnet18(path), autoattack_resnet18,
        sha256="399f52da9f914c323fa5a6096d60f460a3449a59b64a6405200c1e629f8425a7",
        locate=find_autoattack_checkpoint),
}


def public_path(name: str, weights_dir: Path | None) -> Path:
    """Where the file of ``name`` is: in ``weights_dir`` under one of its names, else where the entry's
    ``locate`` finds it (the AutoAttack model inside the installed ``pyautoattack``)."""
    entry = PUBLIC[name]
    for file in (entry.file, *entry.alternatives):
        if weights_dir is not None and (Path(weights_dir) / file).exists():
            return Path(weights_dir) / file
    found = entry.locate() if entry.locate is not None else None
    if found is not None:
        return found
    how = (f"run `ssni fetch {name} --weights-dir {weights_dir}`" if entry.download else
           f"download it from {entry.url} into that folder (see `ssni models`)")
    raise CheckpointError(f"{entry.file} for {name!r} not found in {weights_dir}; {how}")


def load_public(name: str, weights_dir: Path | None, allow_pickle: bool = False) -> nn.Module:
    """Load a public checkpoint by registry name, in eval mode."""
    if name not in PUBLIC:
        raise CheckpointError(f"unknown public model {name!r}; known: {sorted(PUBLIC)}")
    entry, path = PUBLIC[name], public_path(name, weights_dir)
    if entry.sha256 is not None and file_sha256(path) != entry.sha256:
        raise CheckpointError(f"{path} does not match the published {entry.file} (sha256 differs); download it again")
    return entry.load(path, allow_pickle).eval()
