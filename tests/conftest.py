"""Shared fixtures: an oracle Gaussian denoiser, tiny random networks, per-sample noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssni.denoisers import UNet, UNetConfig
from ssni.classifiers import SmallCNN, SmallCNNConfig
from ssni.diffusion import VPSchedule, broadcast_to
from ssni.rng import SampleNoise

torch.set_num_threads(1)  # tiny models: one thread is as fast and keeps tests steady on shared cores


class OracleGaussian(nn.Module):
    """Exact epsilon for data ``x0 ~ N(0, s^2 I)``: ``sqrt(1-abar) x_t / (abar s^2 + 1 - abar)``."""

    def __init__(self, s: float = 0.5, schedule: VPSchedule = VPSchedule()):
        super().__init__()
        self.s, self.schedule = s, schedule
        self.dummy = nn.Parameter(torch.ones(()))  # lets tests check that gradients reach "the network"

    def forward(self, x_t, t):
        abar = broadcast_to(self.schedule.abar(t, like=x_t), x_t)
        return self.dummy * (1 - abar).sqrt() * x_t / (abar * self.s**2 + 1 - abar)


@pytest.fixture
def oracle():
    return OracleGaussian()


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=8, channel_mults=(1, 2))).eval()


@pytest.fixture
def tiny_classifier():
    torch.manual_seed(1)
    return SmallCNN(SmallCNNConfig(width=4)).eval()


@pytest.fixture
def images():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(5, 1, 28, 28, generator=gen)


def noise_for(ids, run_seed: int = 0, draw: int = 0) -> SampleNoise:
    return SampleNoise.from_ids(run_seed, ids, draw)


@pytest.fixture
def tiny_weights(tmp_path, tiny_unet):
    """A weights folder: a tiny random UNet beside the shipped (real, trained) MNIST classifier."""
    from ssni.weights_io import save_weights
    from ssni.checkpoints.registry import default_weights_dir, load_named, register

    folder = tmp_path / "weights"
    classifier = load_named("mnist-cnn", default_weights_dir())
    for name, model, arch in (("mnist-unet", tiny_unet, "unet"), ("mnist-cnn", classifier, "small_cnn")):
        digest = save_weights(folder / f"{name}.safetensors", model)
        register(folder, name, {"arch": arch, "config": model.config.to_dict(),
                                "file": f"{name}.safetensors", "sha256": digest})
    return folder


TINY_EXPERIMENT = """
[data]
n = 2
[purifier]
method = "diffpure"
t_star = 20
steps = 2
[ssni]
reweight = "sigmoid"
n_levels = 2
calibration_size = 8
[[attacks]]
name = "pgd"
steps = 1
eot = 1
[evaluate]
batch_size = 2
rescore_draws = 2
"""  # DiffPure + SSNI-N at plumbing size, for the tiny_weights models


@pytest.fixture
def write_toml(tmp_path):
    """``write_toml(text, name="exp.toml")`` writes a config file into the test's folder and returns its path."""
    def write(text: str, name: str = "exp.toml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.fixture
def tiny_config_file(write_toml):
    return write_toml(TINY_EXPERIMENT)


def assert_same_rows(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    """Per-sample rows equal: every float (score norms, fresh or adversarial) to a relative ``rel``,
    since a float sum can differ in its last bits between batch sizes and CPUs; everything else
    (ids, predictions, levels, verdicts) exactly."""
    def same(x, y) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return x == pytest.approx(y, rel=rel)
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y

    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
        assert same(strip(ra), strip(rb)), (ra, rb)
