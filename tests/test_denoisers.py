import pytest
import torch

from ssni.denoisers import EDMAdapter, UNet, UNetConfig, eps_to_score, eps_to_x0
from ssni.diffusion import VPSchedule, broadcast_to, forward_jump

from conftest import OracleGaussian


@pytest.mark.parametrize("channels,size,attention", [(1, 28, False), (3, 32, True), (1, 32, False)])
def test_unet_shapes_for_mnist_and_cifar_sizes(channels, size, attention):
    net = UNet(UNetConfig(in_channels=channels, base_channels=8, channel_mults=(1, 2, 2), attention=attention))
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([1, 1000])).shape == x.shape


def test_unet_depends_on_the_level():
    net = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2))).eval()
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(net(x, torch.tensor([5])), net(x, torch.tensor([500])))


def test_eps_x0_score_conversions_invert_the_forward_jump():
    s, x0, eps = VPSchedule(), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 300, 999])
    x_t = forward_jump(s, x0, t, eps)
    assert torch.allclose(eps_to_x0(s, x_t, t, eps), x0, atol=1e-4)
    abar = broadcast_to(s.abar(t), x_t)
    assert torch.allclose(eps_to_score(s, t, eps), -eps / (1 - abar).sqrt())


class OracleEDM(torch.nn.Module):
    """EDM-convention denoiser for x0 ~ N(0, s^2): D(x, sigma) = s^2 x / (s^2 + sigma^2)."""

    def forward(self, x, sigma):
        return 0.25 * x / (0.25 + broadcast_to(sigma, x) ** 2)


def test_edm_adapter_matches_the_vp_oracle():
    adapter, vp = EDMAdapter(OracleEDM()), OracleGaussian(s=0.5)
    x_t, t = torch.randn(4, 1, 6, 6), torch.tensor([1, 50, 400, 900])
    assert torch.allclose(adapter(x_t, t), vp(x_t, t), atol=1e-4)


def test_every_adapter_checks_levels_in_the_one_base():
    import pytest
    import torch

    from ssni.denoisers.diffusers_unet import DiffusersEps
    from ssni.denoisers.guided_diffusion import GuidedDiffusionEps
    from ssni.denoisers.protocol import EDMAdapter, EpsAdapter
    from ssni.denoisers.score_sde import ScoreSDEEps
    from ssni.errors import InputError

    for adapter in (DiffusersEps, GuidedDiffusionEps, EDMAdapter, ScoreSDEEps):
        assert issubclass(adapter, EpsAdapter) and "forward" not in vars(adapter)  # one check, in the base
    model = EDMAdapter(lambda x, sigma: torch.zeros_like(x))
    x = torch.zeros(2, 1, 4, 4)
    for bad in (torch.tensor([0, 3]), torch.tensor([3]), torch.tensor([1001, 3]), torch.tensor([[3, 3]])):
        with pytest.raises(InputError):
            model(x, bad)
    assert model(x, torch.tensor([1, 1000])).shape == x.shape


def test_a_valid_level_check_reads_back_from_the_device_once(monkeypatch):
    """On a GPU every read-back of a tensor (``int()``, ``bool()``) stalls the stream: a valid
    level tensor costs one (was three per network call)."""
    import torch

    from ssni.denoisers.protocol import EDMAdapter

    reads = []
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or original(self))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: reads.append(1) or self.item())
    model = EDMAdapter(lambda x, sigma: torch.zeros_like(x))
    model(torch.zeros(2, 1, 4, 4), torch.tensor([1, 1000]))
    assert len(reads) == 1
