"""Paper presets: every file parses; dry runs go end to end on random-init published architectures."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from ssni.evaluate import evaluate, load_config
from ssni.evaluate.config import dry_run
from ssni.evaluate.store import Store

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


def test_there_is_a_preset_for_every_paper_setting():
    names = {p.stem for p in CONFIGS}
    for arch in ("wrn28", "wrn70"):
        for method in ("diffpure", "gdmp", "gns"):
            for tag in ("base", "ssni-l", "ssni-n"):
                for threat in ("linf", "l2"):
                    assert {f"cifar10-{arch}-{method}-{tag}-{threat}", f"cifar10-{arch}-{method}-{tag}-{threat}-repro",
                            f"cifar10-{arch}-diffpure-sde-{tag}-{threat}"} <= names
    for tag in ("base", "ssni-l", "ssni-n"):
        assert {f"imagenet-resnet50-diffpure-{tag}-linf", f"imagenet-resnet50-diffpure-{tag}-linf-repro",
                f"imagenet-resnet50-diffpure-sde-{tag}-linf"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_preset_parses(path):
    cfg = load_config(path)
    if cfg.data.dataset not in ("cifar10", "imagenet"):
        return
    attack, purifier = cfg.attacks[0], cfg.purifier
    assert attack.steps == 200 and attack.eot == 20 and cfg.data.subset == "paper"  # the paper's protocol
    assert cfg.data.n == {"cifar10": 512, "imagenet": 128}[cfg.data.dataset]
    repro = path.stem.endswith("-repro")
    assert (attack.gradient, cfg.evaluate.rescore) == (("surrogate", "single") if repro else ("exact", "worst"))
    assert cfg.evaluate.rescore_draws == 8 and cfg.ssni.reference_compat == repro
    assert purifier.solver == ("sde" if "-sde-" in path.stem else "ddpm")
    assert purifier.clip_x0 == (purifier.method == "gdmp")  # as each reference does
    assert purifier.votes == (10 if purifier.method in ("gdmp", "gns") else 1)
    assert getattr(purifier.settings, "reference_compat", False) == (repro and purifier.method == "gdmp")
    assert f"[purifier.{purifier.method}]" in path.read_text()  # the method's own keys in its own table


@pytest.fixture
def cifar_root(tmp_path):
    """CIFAR-10 python batches in the published format, 4 random images each."""
    rng = np.random.default_rng(0)
    for name in ["test_batch", *(f"data_batch_{i}" for i in range(1, 6))]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8),
                         b"labels": [0, 1, 2, 3]}, f)
    return tmp_path


@pytest.mark.parametrize("name,diffusion", [("cifar10-wrn28-diffpure-ssni-n-linf", None),
                                            ("cifar10-wrn28-gdmp-ssni-l-l2", None),
                                            ("cifar10-wrn28-gdmp-ssni-n-linf-repro", None),  # WRN-70-16: minutes
                                            ("cifar10-wrn28-diffpure-sde-ssni-n-l2", None),
                                            ("cifar10-wrn28-diffpure-ssni-n-linf", "cifar10-edm-uncond-vp")])
def test_dry_run_on_random_init_published_architectures(name, diffusion, cifar_root, tmp_path):
    overrides = {"data.root": str(cifar_root), "evaluate.device": "cpu"}
    if diffusion:  # any public diffusion model can purify
        overrides["models.diffusion"] = diffusion
    _dry_run(name, overrides, tmp_path)


@pytest.mark.skipif(not os.environ.get("SSNI_SLOW_TESTS"), reason="5-8 min and 5.7 GB on 2 CPU cores; set SSNI_SLOW_TESTS=1")
@pytest.mark.parametrize("name", [f"imagenet-resnet50-diffpure-{t}-linf" for t in ("base", "ssni-l", "ssni-n")])
def test_imagenet_dry_run_on_the_552m_parameter_guided_diffusion(name, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for label in ("n01440764", "n01443537"):
            (tmp_path / "imagenet" / part / label).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(
                tmp_path / "imagenet" / part / label / "a.png")
    _dry_run(name, {"data.root": str(tmp_path / "imagenet"), "evaluate.device": "cpu"}, tmp_path)


def _dry_run(name: str, overrides: dict, tmp_path: Path) -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.toml", overrides)
    cfg = dry_run(cfg, n=2)
    path = evaluate(cfg, tmp_path / "run", tmp_path / "no-weights", progress=False)
    store = Store(path, cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    rows = store.rows()
    store.close()
    assert len(rows) == 2 and all(r["t_star"] for r in rows)
