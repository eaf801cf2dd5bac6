"""Golden purifier fixtures (``tests/golden/purifiers/``) from the reference projects' own code.

    SSNI_REFERENCES=/path/to/checkouts python tests/golden/generate/purifiers.py [gdmp gns diffpure_sde]
        re-runs each reference on the committed fixture's input and recorded noise and compares its
        output with the committed one;
    ... --write DIR   draws new noise (seeded) and writes fresh fixtures into DIR.

Every reference network is replaced by the closed-form oracle epsilon of Gaussian data
``x0 ~ N(0, 0.5^2 I)``: ``eps*(x_t) = sqrt(1 - abar) x_t / (0.25 abar + 1 - abar)``, with ``abar`` taken
from the reference's own schedule at the label the reference passes (``_common.py`` has the plumbing).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, compare, main, randn_like_from, reference, stand_in  # noqa: E402

FIXTURES = GOLDEN / "purifiers"
SEED = 0


def oracle_eps(x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    abar = abar.to(x).reshape(-1, *[1] * (x.dim() - 1))
    return (1 - abar).sqrt() * x / (0.25 * abar + 1 - abar)


class Oracle(torch.nn.Module):
    """``model(x, t)`` -> the oracle epsilon, ``abar = abar_of(t)`` (the reference's own table)."""

    def __init__(self, abar_of):
        super().__init__()
        self.abar_of = abar_of

    def forward(self, x, t, *args, **kwargs):
        return oracle_eps(x, self.abar_of(t))


def draws_for(write: Path | None, stored: dict | None, order: list[str]):
    """Check: the stored draws in ``order`` (keys; ``key[j]`` indexes a stack). Write: a recorder."""
    if write is None:
        return iter([stored[k] if "[" not in k else stored[k.split("[")[0]][int(k.split("[")[1][:-1])]
                     for k in order])
    gen, record = torch.Generator().manual_seed(SEED), []

    def draw(like):
        record.append(torch.randn(like.shape, generator=gen))
        return record[-1]

    draw.record = record
    return draw


def stacked(record: list[torch.Tensor], order: list[str]) -> dict:
    """The recorded draws as the fixture stores them (``key[j]`` entries stacked per key)."""
    out, stacks = {}, {}
    for key, value in zip(order, record):
        if "[" in key:
            stacks.setdefault(key.split("[")[0], []).append(value)
        else:
            out[key] = value
    return {**out, **{k: torch.stack(v) for k, v in stacks.items()}}


def finish(name: str, write: Path | None, produced: dict, inputs: dict, draws, order: list[str]) -> bool:
    """Compare with the committed fixture, or save a new one; either way the reference drew exactly the
    noise ``order`` lists (a different call order would serve draws to the wrong places)."""
    if write is None:
        assert next(draws, None) is None, "the reference drew less noise than the fixture holds"
        return compare(name, produced, torch.load(FIXTURES / f"{name}.pt", weights_only=True))
    assert len(draws.record) == len(order), (len(draws.record), len(order))
    write.mkdir(parents=True, exist_ok=True)
    torch.save({**inputs, **produced, **stacked(draws.record, order)}, write / f"{name}.pt")
    print(f"  wrote {write / f'{name}.pt'}")
    return True


def gdmp(write: Path | None) -> bool | None:
    """gdmp_round.pt: JinyiW/GuidedDiffusionPur purification/diff_purify.py, 2 rounds at purify_step 36"""
    if reference("GuidedDiffusionPur") is None:
        return None
    # its utils package: the [0, 1] <-> [-1, 1] maps (torchvision Normalize) and the F it re-exports
    stand_in("utils", F=torch.nn.functional, raw_to_diff=lambda dset: (lambda x: (x - 0.5) / 0.5),
             diff_to_raw=lambda dset: (lambda x: (x + 1.0) / 2.0))
    from purification.diff_purify import diff_purify
    from pytorch_diffusion.diffusion import Diffusion

    diffusion = Diffusion.__new__(Diffusion)  # the CIFAR-10 settings of Diffusion.from_pretrained, no network
    diffusion.init_diffusion_parameters(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                        num_diffusion_timesteps=1000, model_var_type="fixedlarge")
    table = torch.tensor(diffusion.alphas_cumprod)
    diffusion.model = Oracle(lambda t: table[torch.as_tensor(t).long()])  # 0-based step labels
    diffusion.device = torch.device("cpu")
    ns = types.SimpleNamespace
    config = ns(structure=ns(dataset="CIFAR10"), device=ns(diff_device="cpu"), attack=ns(ptb=8.0),
                purification=ns(purify_step=36, guide_mode="MSE", guide_scale=60000.0, cond=True))
    stored = None if write else torch.load(FIXTURES / "gdmp_round.pt", weights_only=True)
    x = stored["x"] if stored else torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(SEED + 1))
    # per round: the jump, then per step (levels 36 .. 1) the guidance target's noise and the step's noise
    order = [k for r in range(2) for k in [f"forward_{r}"] + [f"{kind}_{r}[{j}]" for j in range(36)
                                                                for kind in ("guide", "reverse")]]
    draws = draws_for(write, stored, order)
    with randn_like_from(draws):
        rounds = diff_purify(x, diffusion, 2, None, config)
    return finish("gdmp_round", write, {"out_round1": rounds[0], "out_round2": rounds[1]}, {"x": x}, draws, order)


def gns(write: Path | None) -> bool | None:
    """gns_round.pt: ml-postech/robust-evaluation-of-diffusion-based-purification PurificationForward.preprocess"""
    if reference("robust-evaluation-of-diffusion-based-purification") is None:
        return None
    transforms = stand_in("torchvision.transforms")  # utils.normalize (ImageNet only) is not called
    stand_in("torchvision", transforms=transforms)
    from purification import PurificationForward

    levels = (3, 3, 5)
    # test.py get_diffusion_params with as many denoising steps as levels (the gradual-noise script's
    # full denoising): jump index t - 1, steps [0, 1, ..., t - 1]
    max_timestep = [t - 1 for t in levels]
    steps = [list(range(t)) for t in levels]
    forward = PurificationForward(None, None, max_timestep, steps, "ddpm", False, "cpu")
    forward.diffusion = Oracle(lambda t: forward.compute_alpha(t.long()).flatten())  # label t: level t + 1
    stored = None if write else torch.load(FIXTURES / "gns_round.pt", weights_only=True)
    x = stored["x"] if stored else torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(SEED + 2))
    order = [k for r, t in enumerate(levels) for k in [f"forward_{r}"] + [f"reverse_{r}[{j}]" for j in range(t)]]
    draws = draws_for(write, stored, order)
    with randn_like_from(draws), torch.no_grad():
        out = forward.preprocess(x)
    return finish("gns_round", write, {"out": out}, {"x": x, "levels": torch.tensor(levels)}, draws, order)


def diffpure_sde(write: Path | None) -> bool | None:
    """diffpure_sde.pt: NVlabs/DiffPure runners/diffpure_sde.py RevVPSDE under torchsde.sdeint_adjoint (euler)"""
    if reference("DiffPure") is None:
        return None
    try:
        import torchsde
    except ImportError:
        print("  torchsde is not importable: put torchsde 0.2.6 in $SSNI_REFERENCE_PACKAGES")
        return None
    stand_in("score_sde.op", upfirdn2d=None, FusedLeakyReLU=None, fused_leaky_relu=None)  # CUDA ops, unused
    stand_in("torchvision.utils")  # image saving only
    stand_in("torchvision", utils=sys.modules["torchvision.utils"])
    from runners.diffpure_sde import RevVPSDE

    t_star = 3
    oracle = Oracle(lambda labels: torch.exp(-0.5 * (20 - 0.1) * (labels / 999) ** 2 - 0.1 * labels / 999))
    rev = RevVPSDE(oracle, score_type="score_sde", img_shape=(3, 4, 4))  # score-SDE labels 999 s
    stored = None if write else torch.load(FIXTURES / "diffpure_sde.pt", weights_only=True)
    x = stored["x"] if stored else torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(SEED + 3))
    gen = torch.Generator().manual_seed(SEED)
    e = stored["forward_0"] if stored else torch.randn(x.shape, generator=gen)
    # image_editing_sample: the jump with the discrete betas' abar at index t - 1, then the reverse SDE
    a = (1 - rev.discrete_betas.float()).cumprod(dim=0)
    x_t = (2 * x - 1) * a[t_star - 1].sqrt() + e * (1.0 - a[t_star - 1]).sqrt()
    t0, t1 = 1 - t_star / 1000, 1 - 1e-5
    bm = brownian(stored["dW"] if stored else None, x, gen)
    with torch.no_grad():
        xs = torchsde.sdeint_adjoint(rev, x_t.view(4, -1), torch.linspace(t0, t1, 2), method="euler", bm=bm)
    out = xs[-1].view(x.shape)
    if write is None:
        dt = torch.tensor(bm.lengths, dtype=torch.float64)
        return compare("diffpure_sde", {"out_model_scale": out, "dt": dt}, stored)
    write.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "forward_0": e, "dW": torch.stack(bm.served).view(-1, *x.shape),
                "dt": torch.tensor(bm.lengths, dtype=torch.float64), "t_star": torch.tensor(t_star),
                "out_model_scale": out}, write / "diffpure_sde.pt")
    print(f"  wrote {write / 'diffpure_sde.pt'}")
    return True


def brownian(stored_dw: torch.Tensor | None, x: torch.Tensor, gen: torch.Generator):
    """A torchsde Brownian motion for the Euler steps: the fixture's increments in order (check), or
    fresh ones ``sqrt(tb - ta) z`` (write); either way each served increment and its length is kept."""
    from torchsde._brownian.brownian_base import BaseBrownian

    shape = (x.shape[0], x[0].numel())

    class Increments(BaseBrownian):
        def __init__(self):
            self.served, self.lengths = [], []

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            dt = float(tb - ta)
            k = len(self.served)
            dw = stored_dw[k].reshape(shape) if stored_dw is not None else dt ** 0.5 * torch.randn(shape, generator=gen)
            self.served.append(dw)
            self.lengths.append(dt)
            return dw

        def __repr__(self):
            return "Increments()"

        dtype = property(lambda self: torch.float32)
        device = property(lambda self: torch.device("cpu"))
        shape = property(lambda self: torch.Size(shape))
        levy_area_approximation = property(lambda self: "none")

    return Increments()


if __name__ == "__main__":
    main({"gdmp": gdmp, "gns": gns, "diffpure_sde": diffpure_sde}, __doc__)
