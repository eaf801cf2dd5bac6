"""Classifiers in published state-dict layouts: sizes, strict loading, errors, [0, 1] input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ssni.classifiers.resnet import (
    ImageNetResNet, ResNet, ResNetConfig, autoattack_resnet18, find_autoattack_checkpoint,
    load_autoattack_resnet18, load_into, load_torchvision_resnet, torchvision_resnet,
)
from ssni.classifiers.wideresnet import (
    CIFAR10_MEAN, CIFAR10_STD, DMWideResNet, DMWideResNetConfig, WideResNet, WideResNetConfig, load_dm_wideresnet,
    load_paper_wrn_70_16, load_wideresnet, paper_wrn_70_16_config,
)
from ssni.errors import CheckpointError, ConfigError, InputError

torch.set_num_threads(1)

TINY_WRN = WideResNetConfig(depth=10, widen_factor=1)
TINY_DM = DMWideResNetConfig(depth=10, width=1)
TINY_PAPER = WideResNetConfig(depth=10, widen_factor=1, drop_rate=0.3, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build):
    with torch.device("meta"):
        return build()


def trained_like(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights plus non-trivial BatchNorm statistics, so a wrong load shows in outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and name not in ("mean", "std"):
                offset = 0.75 if "running_var" in name else -0.25
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + offset)
    return module.eval()


@pytest.mark.parametrize("build, count", [
    (lambda: WideResNet(), 36_479_194),                      # RobustBench Standard, WRN-28-10
    (lambda: DMWideResNet(), 266_796_506),                   # Gowal2020Uncovering_70_16(_extra), ~266.8M
    (lambda: WideResNet(paper_wrn_70_16_config()), 266_796_506),  # DiffPure/SSNI WideResNet_70_16_dropout
    (lambda: torchvision_resnet("resnet50"), 25_557_032),    # torchvision ResNet-50
    (lambda: torchvision_resnet("resnet18"), 11_689_512),    # torchvision ResNet-18
    (autoattack_resnet18, 11_173_962),                       # pyautoattack examples/model_test.pt
])
def test_full_size_parameter_counts_match_published(build, count):
    assert n_params(on_meta(build)) == count


def test_full_size_keys_and_shapes_follow_published_layouts():
    wrn = on_meta(WideResNet).state_dict()
    assert len(wrn) == 155
    assert wrn["block1.layer.0.convShortcut.weight"].shape == (160, 16, 1, 1)
    assert wrn["block3.layer.3.conv2.weight"].shape == (640, 640, 3, 3)
    assert wrn["bn1.running_var"].shape == (640,) and wrn["fc.weight"].shape == (10, 640)
    dm = on_meta(DMWideResNet).state_dict()
    assert len(dm) == 407 and "mean" not in dm and "std" not in dm  # non-persistent, as in RobustBench
    assert on_meta(DMWideResNet).mean.shape == (3, 1, 1)
    assert dm["init_conv.weight"].shape == (16, 3, 3, 3)
    assert dm["layer.0.block.0.shortcut.weight"].shape == (256, 16, 1, 1)
    assert dm["layer.2.block.10.batchnorm_1.weight"].shape == (1024,)
    assert dm["logits.weight"].shape == (10, 1024) and "layer.0.block.1.shortcut.weight" not in dm
    paper = on_meta(lambda: WideResNet(paper_wrn_70_16_config())).state_dict()
    assert len(paper) == 33 * 12 + 3 + 1 + 5 + 2 and "mean" not in paper  # blocks, shortcuts, conv1, bn1, fc
    assert paper["block1.layer.0.convShortcut.weight"].shape == (256, 16, 1, 1)
    assert paper["block3.layer.10.conv2.weight"].shape == (1024, 1024, 3, 3) and paper["fc.weight"].shape == (10, 1024)
    r50 = on_meta(lambda: torchvision_resnet("resnet50")).state_dict()
    assert len(r50) == 320 and "mean" not in r50
    assert r50["conv1.weight"].shape == (64, 3, 7, 7)
    assert r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert r50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1) and r50["fc.weight"].shape == (1000, 2048)
    aa = on_meta(autoattack_resnet18).state_dict()
    assert aa["conv1.weight"].shape == (64, 3, 3, 3) and aa["linear.weight"].shape == (10, 512)
    assert aa["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)


@pytest.mark.parametrize("build, load", [
    (lambda: WideResNet(TINY_WRN), lambda p: load_wideresnet(p, TINY_WRN)),
    (lambda: WideResNet(WideResNetConfig(10, 2, sub_block1=True)),
     lambda p: load_wideresnet(p, WideResNetConfig(10, 2, sub_block1=True))),
    (lambda: DMWideResNet(TINY_DM), lambda p: load_dm_wideresnet(p, TINY_DM)),
    (lambda: WideResNet(TINY_PAPER), lambda p: load_paper_wrn_70_16(p, TINY_PAPER)),
    (lambda: torchvision_resnet("resnet18", 7), lambda p: load_torchvision_resnet(p, "resnet18", 7)),
    (autoattack_resnet18, load_autoattack_resnet18),
])
def test_published_layout_file_loads_strictly_with_identical_outputs(tmp_path, build, load):
    source = trained_like(build())
    path = tmp_path / "published.pt"
    torch.save(source.state_dict(), path)
    loaded = load(path)
    x = torch.rand(2, 3, 32, 32)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_bottleneck_resnet_round_trips(tmp_path):
    config = ResNetConfig(block="bottleneck", layers=(1, 1, 1, 1), num_classes=3)
    source, path = trained_like(ImageNetResNet(config)), tmp_path / "r.pt"
    torch.save(source.state_dict(), path)
    loaded = load_into(ImageNetResNet(config), path)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_training_checkpoint_packaging_is_unwrapped(tmp_path):
    """``{"state_dict": {"module." + key: ...}}`` and pre-0.4 files without BN counters load."""
    source = trained_like(DMWideResNet(TINY_DM))
    state = {f"module.{k}": v for k, v in source.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(load_dm_wideresnet(path, TINY_DM)(x), source(x), rtol=0, atol=0)


def test_dm_wideresnet_file_with_mean_std_is_accepted_and_its_values_used(tmp_path):
    """Older exports hold ``mean``/``std``; RobustBench's do not. Both load; the file's values win."""
    source = trained_like(DMWideResNet(TINY_DM))
    state = dict(source.state_dict(), mean=torch.full((3, 1, 1), 0.5), std=torch.full((3, 1, 1), 0.25))
    path = tmp_path / "with_stats.pt"
    torch.save(state, path)
    loaded = load_dm_wideresnet(path, TINY_DM)
    assert torch.equal(loaded.mean, torch.full((3, 1, 1), 0.5)) and torch.equal(loaded.std, torch.full((3, 1, 1), 0.25))
    torch.save(dict(state, mean=torch.zeros(4)), path)
    with pytest.raises(CheckpointError, match="'mean' has shape"):
        load_dm_wideresnet(path, TINY_DM)


def test_paper_wrn_normalises_inside_and_drops_out_only_in_training():
    model = trained_like(WideResNet(TINY_PAPER))
    plain = WideResNet(WideResNetConfig(depth=10, widen_factor=1))
    plain.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(model(x), plain.eval()((x - mean) / std))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.allclose(first, model(x))  # dropout 0.3 draws anew in training mode
    with pytest.raises(ConfigError, match="mean and std"):
        WideResNetConfig(mean=CIFAR10_MEAN)


def test_shape_mismatch_is_listed(tmp_path):
    path = tmp_path / "wrn.pt"
    torch.save(WideResNet(TINY_WRN).state_dict(), path)
    expected = r"does not fit WideResNet: .*shape mismatch .*expected \(32, 16, 3, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        load_wideresnet(path, WideResNetConfig(depth=10, widen_factor=2))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = DMWideResNet(TINY_DM).state_dict()
    del state["logits.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "dm.pt"
    torch.save(state, path)
    expected = r"missing \(1\): logits\.weight; unexpected \(1\): extra\.weight"
    with pytest.raises(CheckpointError, match=expected):
        load_dm_wideresnet(path, TINY_DM)


def test_wrong_family_is_refused(tmp_path):
    path = tmp_path / "aa.pt"
    torch.save(autoattack_resnet18().state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit ImageNetResNet"):
        load_torchvision_resnet(path, "resnet18", 10)


def test_truncated_or_absent_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(WideResNet(TINY_WRN).state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_wideresnet(path, TINY_WRN)
    with pytest.raises(CheckpointError, match="not found"):
        load_wideresnet(tmp_path / "absent.pt", TINY_WRN)


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a state dict of tensors: entries epoch"):
        load_wideresnet(path, TINY_WRN)


def test_imagenet_resnet_normalises_inside():
    config = ResNetConfig(block="basic", layers=(1, 1, 1, 1), num_classes=5)
    wrapped = trained_like(ImageNetResNet(config))
    bare = ResNet(config).eval()
    bare.load_state_dict(wrapped.state_dict(), strict=True)  # same unprefixed keys
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(wrapped(x), bare((x - mean.view(3, 1, 1)) / std.view(3, 1, 1)))


def test_dm_wideresnet_normalises_inside_and_pads():
    model = trained_like(DMWideResNet(TINY_DM))
    plain = DMWideResNet(DMWideResNetConfig(depth=10, width=1, mean=(0.0,) * 3, std=(1.0,) * 3)).eval()
    weights = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    plain.load_state_dict(weights, strict=False)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(DMWideResNetConfig().mean), torch.tensor(DMWideResNetConfig().std)
    torch.testing.assert_close(model(x), plain((x - mean.view(3, 1, 1)) / std.view(3, 1, 1)))
    padded = DMWideResNet(DMWideResNetConfig(depth=10, width=1, padding=2)).eval()
    assert padded(torch.rand(1, 3, 28, 28)).shape == (1, 10)  # 28 + 2 * 2 = 32


def test_wrn_refuses_images_that_are_not_32x32():
    with pytest.raises(InputError, match="32x32"):
        WideResNet(TINY_WRN).eval()(torch.rand(1, 3, 64, 64))


def test_configs_validate_and_round_trip():
    with pytest.raises(ConfigError, match="6n \\+ 4"):
        WideResNetConfig(depth=12)
    with pytest.raises(ConfigError, match="activation"):
        DMWideResNetConfig(activation="gelu")
    with pytest.raises(ConfigError, match="unknown torchvision ResNet"):
        torchvision_resnet("resnet7")
    config = DMWideResNetConfig(depth=16, width=2, activation="relu")
    assert DMWideResNetConfig.from_dict(config.to_dict()) == config
    assert ResNetConfig.from_dict({**ResNetConfig().to_dict(), "layers": [2, 2, 2, 2]}).layers == (2, 2, 2, 2)


def _autoattack_file() -> Path | None:
    override = os.environ.get("SSNI_AUTOATTACK_CHECKPOINT")
    return Path(override) if override else find_autoattack_checkpoint()


@pytest.mark.skipif(_autoattack_file() is None, reason="pyautoattack's examples/model_test.pt not available")
def test_real_autoattack_example_checkpoint_loads_without_pickled_code():
    model = load_autoattack_resnet18(_autoattack_file())
    logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert model.bn1.running_var.min() > 0 and int(model.bn1.num_batches_tracked) > 0


def test_registry_wrn_70_16_is_the_papers_standard_model_and_gowal_is_separate(tmp_path):
    from ssni.checkpoints.public import PUBLIC, public_path

    paper, gowal = PUBLIC["cifar10-wrn-70-16"], PUBLIC["cifar10-wrn-70-16-gowal2020"]
    built = on_meta(paper.build)
    assert isinstance(built, WideResNet) and built.config == paper_wrn_70_16_config()
    assert built.config.drop_rate == 0.3 and built.config.mean == CIFAR10_MEAN
    assert isinstance(on_meta(gowal.build), DMWideResNet) and gowal.file == "Gowal2020Uncovering_70_16_extra.pt"
    (tmp_path / "wrn-70-16-dropout").mkdir()
    (tmp_path / "wrn-70-16-dropout" / "weights.pt").write_bytes(b"")
    assert public_path("cifar10-wrn-70-16", tmp_path) == tmp_path / "wrn-70-16-dropout" / "weights.pt"
