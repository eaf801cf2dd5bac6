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
from pathlib import Path

import pytest
import torch

from ssni.classifiers.wideresnet import (CIFAR10_MEAN, CIFAR10_STD, DMWideResNetConfig, WideResNetConfig,
                                         load_dm_wideresnet, load_paper_wrn_70_16, load_wideresnet)
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
