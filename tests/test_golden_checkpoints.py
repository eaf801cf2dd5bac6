"""Golden checkpoints: files written by each reference project's own code load strictly here and
reproduce the reference network's outputs (relative error below 1e-5 in float32).

Every fixture under ``tests/golden/checkpoints/`` was made in a scratch folder outside this
repository by the reference network class at a tiny seeded configuration with perturbed random
weights, saved the way that project saves its checkpoints; ``tests/golden/README.md`` names the
repository and commit of each. ``*.gz`` fixtures are the reference file byte for byte, gzipped
only to keep the repository small; the test unpacks them before loading.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ssni.checkpoints.edm_pickle import convert_edm_pickle
from ssni.classifiers.resnet import ImageNetResNet, ResNetConfig, load_into
from ssni.classifiers.wideresnet import (CIFAR10_MEAN, CIFAR10_STD, DMWideResNetConfig, WideResNetConfig,
                                         load_dm_wideresnet, load_paper_wrn_70_16, load_wideresnet)
from ssni.checkpoints.edm_files import load_edm
from ssni.denoisers.guided_diffusion import GuidedDiffusionConfig, GuidedDiffusionEps, load_guided_diffusion
from ssni.denoisers.protocol import EDMAdapter
from ssni.denoisers.score_sde import ScoreSDEConfig, ScoreSDEEps, load_score_sde

torch.set_num_threads(1)

GOLDEN = Path(__file__).parent / "golden" / "checkpoints"
RTOL = 1e-5


def fixture(name: str, tmp_path: Path) -> Path:
    """Path of a golden file; a ``.gz`` one is unpacked into ``tmp_path`` first."""
    path = GOLDEN / name
    if path.suffix != ".gz":
        return path
    target = tmp_path / path.stem
    with gzip.open(path, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < RTOL, f"relative error {rel:.2e} >= {RTOL}"


def io(name: str) -> dict:
    return torch.load(GOLDEN / name, weights_only=True)


# --- score_sde_pytorch NCSNpp (DDPM++), the DiffPure CIFAR-10 model ------------------------------

SCORE_SDE_TINY = ScoreSDEConfig(image_size=8, nf=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def test_score_sde_reference_checkpoint_has_the_published_structure():
    """The fixture is what run_lib writes: sigmas buffer in 'model', one EMA tensor per parameter."""
    checkpoint = torch.load(GOLDEN / "score_sde_checkpoint.pth", weights_only=True)
    assert set(checkpoint) == {"optimizer", "model", "ema", "step"}
    assert next(iter(checkpoint["model"])) == "module.sigmas" and checkpoint["model"]["module.sigmas"].shape == (1000,)
    assert len(checkpoint["model"]) == len(checkpoint["ema"]["shadow_params"]) + 1


@pytest.mark.parametrize("weights, key", [("ema", "out_ema"), ("model", "out_model")])
def test_score_sde_checkpoint_reproduces_the_reference_outputs(weights, key):
    ref = io("score_sde_io.pt")
    net = load_score_sde(GOLDEN / "score_sde_checkpoint.pth", SCORE_SDE_TINY, weights=weights)
    with torch.no_grad():
        assert_close_rel(net(ref["x"], ref["labels"]), ref[key])
        # the protocol adapter: level t -> label 999 t / 1000, output unchanged (DiffPure's convention)
        assert_close_rel(ScoreSDEEps(net)(ref["x"], ref["t"]), ref[key])
    other = "out_model" if key == "out_ema" else "out_ema"
    assert ((ref[key] - ref[other]).norm() / ref[key].norm()) > 0.1  # the two weight sets are told apart


# --- classifiers: RobustBench and the paper's standard WRN-70-16 ---------------------------------

CLASSIFIERS = {
    "robustbench_dmwrn": lambda p: load_dm_wideresnet(p, DMWideResNetConfig(depth=10, width=1)),
    "robustbench_wrn": lambda p: load_wideresnet(p, WideResNetConfig(depth=10, widen_factor=1)),
    "paper_wrn": lambda p: load_paper_wrn_70_16(p, WideResNetConfig(depth=10, widen_factor=1, drop_rate=0.3,
                                                                     mean=CIFAR10_MEAN, std=CIFAR10_STD)),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_checkpoint_reproduces_the_reference_logits(name, tmp_path):
    ref = io(f"{name}_io.pt")
    model = CLASSIFIERS[name](fixture(f"{name}.pt.gz", tmp_path))
    assert not model.training
    with torch.no_grad():
        assert_close_rel(model(ref["x"]), ref["logits"])


def test_torchvision_resnet_checkpoint_reproduces_the_reference_logits():
    """torchvision's Bottleneck ResNet at 4 stem channels; ours normalises [0, 1] input inside."""
    ref = io("torchvision_resnet_io.pt")
    model = load_into(ImageNetResNet(ResNetConfig(layers=(1, 1, 1, 1), num_classes=7, width=4)),
                      GOLDEN / "torchvision_resnet.pt")
    with torch.no_grad():
        assert_close_rel(model(ref["x"]), ref["logits"])


# --- other diffusion families ---------------------------------------------------------------------

def test_guided_diffusion_checkpoint_reproduces_the_reference_outputs(tmp_path):
    ref = io("guided_diffusion_io.pt")
    config = GuidedDiffusionConfig(image_size=8, model_channels=32, channel_mult=(1, 1), num_res_blocks=0,
                                   attention_resolutions=(4,), num_heads=4, num_head_channels=16)
    net = load_guided_diffusion(fixture("guided_diffusion.pt.gz", tmp_path), config)
    with torch.no_grad():
        assert_close_rel(net(ref["x"], ref["steps"]), ref["out"])  # 6 channels: eps and the variance output
        # protocol levels are 1-based; the adapter keeps the epsilon half
        assert_close_rel(GuidedDiffusionEps(net)(ref["x"], ref["steps"] + 1), ref["out"][:, :3])


def test_edm_network_pickle_reproduces_the_reference_denoiser_without_running_its_code(tmp_path):
    """A training_loop snapshot (ema, loss_fn, augment_pipe, dataset_kwargs) of persistence classes."""
    ref = io("edm_io.pt")
    path = fixture("edm-network-snapshot.pkl.gz", tmp_path)
    denoiser = load_edm(path, allow_pickle=True)
    assert "training.networks" not in sys.modules and "torch_utils.persistence" not in sys.modules
    with torch.no_grad():
        assert_close_rel(denoiser(ref["x"], ref["sigma"]), ref["out"])
        converted = tmp_path / "edm.safetensors"
        convert_edm_pickle(path, converted)
        assert_close_rel(load_edm(converted)(ref["x"], ref["sigma"]), ref["out"])
        assert EDMAdapter(denoiser)(ref["x"], torch.tensor([3, 500])).shape == ref["x"].shape


def test_diffusers_pipeline_folder_reproduces_the_reference_unet():
    pytest.importorskip("diffusers")
    from ssni.denoisers.diffusers_unet import DiffusersEps, load_diffusers_unet

    ref = io("diffusers_io.pt")
    unet = load_diffusers_unet(GOLDEN / "diffusers_ddpm")
    with torch.no_grad():
        assert_close_rel(unet(ref["x"], ref["steps"]).sample, ref["out"])
        assert_close_rel(DiffusersEps(unet)(ref["x"], ref["steps"] + 1), ref["out"])


def test_fixtures_stay_small():
    files = [p for p in GOLDEN.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 300_000 for p in files)
    assert sum(p.stat().st_size for p in files) < 3_000_000
