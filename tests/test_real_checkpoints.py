"""Real public weights and images that install from PyPI (the ``real`` extra)."""

import importlib.util

import pytest
import torch

from ssni import Defense, DiffPure
from ssni.checkpoints.public import PUBLIC, load_public
from ssni.data import load_foolbox_samples
from ssni.denoisers import UNet, UNetConfig
from ssni.errors import CheckpointError

needs_real = pytest.mark.skipif(
    importlib.util.find_spec("pyautoattack") is None or importlib.util.find_spec("foolbox") is None,
    reason="needs the real extra: pip install -e '.[real]'")


@needs_real
def test_autoattack_resnet18_classifies_foolbox_cifar10_images():
    images = load_foolbox_samples("cifar10")
    model = load_public("cifar10-resnet18-autoattack", None)
    with torch.no_grad():
        predictions = model(images.images).argmax(1)
    assert images.images.shape == (20, 3, 32, 32)
    assert torch.equal(predictions, images.labels)  # all 20 right, as a new user finds


@needs_real
def test_diffpure_with_a_small_unet_runs_end_to_end_on_real_images():
    images = load_foolbox_samples("cifar10")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=3, base_channels=8, channel_mults=(1, 2))).eval()
    defense = Defense(load_public("cifar10-resnet18-autoattack", None), DiffPure(unet, t_star=10, steps=2))
    x = images.images[:4].clone().requires_grad_(True)
    logits = defense(x)
    logits.sum().backward()
    assert logits.shape == (4, 10) and torch.isfinite(x.grad).all()
    purified, _ = defense.purify(images.images[:4], draw=1)
    assert purified.shape == (4, 3, 32, 32) and 0 <= purified.min() and purified.max() <= 1


def test_public_registry_entries_are_complete():
    for name, entry in PUBLIC.items():
        assert entry.kind in ("diffusion", "classifier") and entry.file and entry.url and entry.license


def test_missing_public_file_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match="download it from"):
        load_public("cifar10-wrn-28-10", tmp_path)
    with pytest.raises(CheckpointError, match="known"):
        load_public("cifar10-wrn-99", tmp_path)
