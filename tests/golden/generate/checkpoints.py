"""Golden checkpoint fixtures (``tests/golden/checkpoints/``) from the reference projects' own classes.

    SSNI_REFERENCES=/path/to/checkouts python tests/golden/generate/checkpoints.py [NAME ...]
        loads each committed file with the reference project's own network class (and its own
        loading code where it has one) and compares one forward pass on the stored input with the
        stored output;
    ... --write DIR   builds each network at its tiny configuration, perturbs its weights (seeded),
        saves it the way its project saves checkpoints and writes ``<name>_io.pt`` beside it.

Names: score_sde, robustbench_dmwrn, robustbench_wrn, paper_wrn, guided_diffusion, edm, diffusers,
torchvision_resnet. ``diffusers`` and ``torchvision_resnet`` need the PyPI packages of the versions in
their ``.source.json`` (the first is in the test extras; put torchvision 0.28.0 in
``$SSNI_REFERENCE_PACKAGES``: only its pure-Python ResNet is used, its compiled ops are stood in for).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, compare, main, packages, reference, source, stand_in  # noqa: E402

FIXTURES = GOLDEN / "checkpoints"
SEED = 0
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_file(path: Path, name: str):
    """A module from one file of a reference (its package ``__init__`` would import far more)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unpacked(name: str) -> Path:
    """A committed fixture; a ``.gz`` one unpacked into a temporary file (the reference file byte for byte)."""
    path = FIXTURES / name
    if path.suffix != ".gz":
        return path
    target = Path(tempfile.mkdtemp()) / path.stem
    with gzip.open(path, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def perturb(model: nn.Module, seed: int, round_to: float | None = None) -> None:
    """Random weights made non-trivial: every parameter and BatchNorm statistic moved by N(0, 0.1^2)
    (zero-initialised output layers then matter); ``round_to`` rounds them to multiples (compression)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.add_(0.1 * torch.randn(value.shape, generator=gen))
                if "running_var" in name:
                    value.abs_().add_(0.1)
                if round_to:
                    value.copy_(torch.round(value / round_to) * round_to)


def check_or_write(name: str, write: Path | None, run, make, io_name: str | None = None) -> bool:
    """Check: ``run(committed file)`` against the stored outputs. Write: ``make(folder)`` saves the file
    the reference's way and returns the path; then ``run`` on it gives the stored outputs."""
    io_name = io_name or f"{name}_io.pt"
    if write is None:
        stored = torch.load(FIXTURES / io_name, weights_only=True)
        inputs = {k: v for k, v in stored.items() if k in ("x", "steps", "t", "labels", "sigma")}
        return compare(name, run(None, inputs), stored)
    write.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED + 7)
    path, inputs = make(write, gen)
    outputs = run(path, inputs)
    torch.save({**inputs, **outputs}, write / io_name)
    print(f"  wrote {path} and {write / io_name}")
    return True


def gzipped(path: Path) -> Path:
    with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return Path(f"{path}.gz")


# --- yang-song/score_sde_pytorch: NCSNpp (DDPM++), EMA, save_checkpoint ----------------------------

def score_sde(write: Path | None) -> bool | None:
    """score_sde_checkpoint.pth: yang-song/score_sde_pytorch NCSNpp + EMA, utils.save/restore_checkpoint"""
    if reference("score_sde_pytorch") is None:
        return None
    stand_in("op", upfirdn2d=None, FusedLeakyReLU=None, fused_leaky_relu=None)  # CUDA ops; FIR is off
    tf = stand_in("tensorflow")  # restore_checkpoint's file checks only
    tf.io = type("io", (), {"gfile": type("gfile", (), {"exists": staticmethod(lambda p: Path(p).exists()),
                                                          "makedirs": staticmethod(lambda p: None)})})
    import losses
    import utils
    from configs.vp.cifar10_ddpmpp_deep_continuous import get_config
    from models import ncsnpp  # noqa: F401  (registers the model)
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage

    config = get_config()
    config.device = torch.device("cpu")
    config.data.image_size, config.model.nf, config.model.ch_mult = 8, 4, (1, 2)
    config.model.num_res_blocks, config.model.attn_resolutions, config.model.num_scales = 1, (4,), 1000

    def build():
        torch.manual_seed(SEED)
        model = mutils.create_model(config)  # DataParallel, as run_lib does
        ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
        optimizer = losses.get_optimizer(config, model.parameters())
        return {"optimizer": optimizer, "model": model, "ema": ema, "step": 0}

    def run(path, inputs):
        state = utils.restore_checkpoint(str(path or FIXTURES / "score_sde_checkpoint.pth"), build(), "cpu")
        model = state["model"].eval()
        with torch.no_grad():
            out_model = model(inputs["x"], inputs["labels"])
            state["ema"].copy_to(model.parameters())
            return {"out_model": out_model, "out_ema": model(inputs["x"], inputs["labels"])}

    def make(folder, gen):
        state = build()
        perturb(state["model"], SEED)
        state["ema"].update(state["model"].parameters())
        perturb(state["model"], SEED + 1)  # EMA and raw weights differ
        path = folder / "score_sde_checkpoint.pth"
        utils.save_checkpoint(str(path), state)
        t = torch.tensor([1, 250, 1000])
        return path, {"x": torch.randn(3, 3, 8, 8, generator=gen), "t": t, "labels": 999 * t.float() / 1000}

    return check_or_write("score_sde", write, run, make)


# --- RobustBench: DMWideResNet (Gowal et al.) and WideResNet (Standard) ----------------------------

def _robustbench(name: str, arch_file: str, build, write: Path | None) -> bool | None:
    root = reference("robustbench")
    if root is None:
        return None
    module = load_file(root / "robustbench" / "model_zoo" / "architectures" / arch_file, f"rb_{name}")

    def run(path, inputs):
        model = build(module)
        model.load_state_dict(torch.load(path or unpacked(f"{name}.pt.gz"), weights_only=True))  # strict
        with torch.no_grad():
            return {"logits": model.eval()(inputs["x"])}

    def make(folder, gen):
        torch.manual_seed(SEED)
        model = build(module)
        perturb(model, SEED, round_to=1 / 64)
        path = folder / f"{name}.pt"
        torch.save(model.state_dict(), path)
        return path, {"x": torch.rand(2, 3, 32, 32, generator=gen)}

    ok = check_or_write(name, write, run, make)
    if write is not None:
        gzipped(write / f"{name}.pt")
    return ok


def robustbench_dmwrn(write: Path | None) -> bool | None:
    """robustbench_dmwrn.pt.gz: RobustBench/robustbench dm_wide_resnet.py DMWideResNet (Swish, CIFAR-10 mean/std)"""
    return _robustbench("robustbench_dmwrn", "dm_wide_resnet.py", lambda m: m.DMWideResNet(
        num_classes=10, depth=10, width=1, activation_fn=m.Swish, mean=m.CIFAR10_MEAN, std=m.CIFAR10_STD), write)


def robustbench_wrn(write: Path | None) -> bool | None:
    """robustbench_wrn.pt.gz: RobustBench/robustbench wide_resnet.py WideResNet (the Standard entry)"""
    return _robustbench("robustbench_wrn", "wide_resnet.py", lambda m: m.WideResNet(depth=10, widen_factor=1),
                        write)


# --- JiachengZ01/SSNI: WideResNet of WideResNet_70_16_dropout ------------------------------------

def paper_wrn(write: Path | None) -> bool | None:
    """paper_wrn.pt.gz: JiachengZ01/SSNI classifiers/cifar10_resnet.py WideResNet, DataParallel state dict"""
    root = reference("SSNI")
    if root is None:
        return None
    module = load_file(root / "classifiers" / "cifar10_resnet.py", "ssni_ref_cifar10_resnet")

    def build():
        return module.WideResNet(depth=10, widen_factor=1, dropRate=0.3)

    def run(path, inputs):
        state = torch.load(path or unpacked("paper_wrn.pt.gz"), weights_only=True)
        model = build()
        model.load_state_dict({k[7:]: v for k, v in state.items()})  # their loaders cut "module."
        with torch.no_grad():
            return {"logits": model.eval()(inputs["x"])}

    def make(folder, gen):
        torch.manual_seed(SEED)
        model = build()
        perturb(model, SEED, round_to=1 / 64)
        path = folder / "paper_wrn.pt"
        torch.save(nn.DataParallel(model).state_dict(), path)
        return path, {"x": torch.rand(2, 3, 32, 32, generator=gen)}

    ok = check_or_write("paper_wrn", write, run, make)
    if write is not None:
        gzipped(write / "paper_wrn.pt")
    return ok


# --- openai/guided-diffusion: create_model at the 256x256-uncond flags, tiny -------------------------

def guided_diffusion(write: Path | None) -> bool | None:
    """guided_diffusion.pt.gz: openai/guided-diffusion script_util.create_model (UNetModel), state dict"""
    if reference("guided-diffusion") is None:
        return None
    from guided_diffusion.script_util import create_model

    def build():
        torch.manual_seed(SEED)
        return create_model(image_size=8, num_channels=32, num_res_blocks=0, channel_mult="1,1", learn_sigma=True,
                            class_cond=False, use_checkpoint=False, attention_resolutions="4", num_heads=4,
                            num_head_channels=16, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
                            resblock_updown=True, use_fp16=False, use_new_attention_order=False)

    def run(path, inputs):
        model = build()
        model.load_state_dict(torch.load(path or unpacked("guided_diffusion.pt.gz"), weights_only=True))
        with torch.no_grad():
            return {"out": model.eval()(inputs["x"], inputs["steps"])}

    def make(folder, gen):
        model = build()
        perturb(model, SEED, round_to=1 / 64)
        path = folder / "guided_diffusion.pt"
        torch.save(model.state_dict(), path)  # TrainLoop.save writes the fp32 master weights' state dict
        return path, {"x": torch.randn(2, 3, 8, 8, generator=gen), "steps": torch.tensor([0, 731])}

    ok = check_or_write("guided_diffusion", write, run, make)
    if write is not None:
        gzipped(write / "guided_diffusion.pt")
    return ok


# --- NVlabs/edm: VPPrecond + SongUNet pickled as training_loop.py does ------------------------------

def edm(write: Path | None) -> bool | None:
    """edm-network-snapshot.pkl.gz: NVlabs/edm training_loop snapshot (VPPrecond + SongUNet, persistence)"""
    if reference("edm") is None:
        return None
    import copy

    import dnnlib  # noqa: F401  (the snapshot's classes resolve through the repo's modules)
    from training import augment, loss, networks

    def run(path, inputs):
        with open(path or unpacked("edm-network-snapshot.pkl.gz"), "rb") as f:
            net = pickle.load(f)["ema"]  # what generate.py loads
        with torch.no_grad():
            return {"out": net(inputs["x"], inputs["sigma"])}

    def make(folder, gen):
        torch.manual_seed(SEED)
        net = networks.VPPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", embedding_type="positional",
                                 encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                                 resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                 attn_resolutions=[4], dropout=0.13)
        perturb(net, SEED, round_to=1 / 64)
        data = {"ema": net, "loss_fn": loss.VPLoss(), "augment_pipe": augment.AugmentPipe(p=0.12),
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10-32x32.zip"}}
        for key, value in data.items():
            if isinstance(value, nn.Module):
                data[key] = copy.deepcopy(value).eval().requires_grad_(False)
        path = folder / "edm-network-snapshot.pkl"
        with open(path, "wb") as f:
            pickle.dump(data, f)
        return path, {"x": torch.randn(2, 3, 8, 8, generator=gen), "sigma": torch.tensor([0.02, 3.0])}

    ok = check_or_write("edm", write, run, make)
    if write is not None:
        gzipped(write / "edm-network-snapshot.pkl")
    return ok


# --- diffusers (PyPI): UNet2DModel in a DDPMPipeline folder ----------------------------------------

def diffusers(write: Path | None) -> bool | None:
    """diffusers_ddpm/: diffusers UNet2DModel, DDPMPipeline.save_pretrained (the installed diffusers)"""
    try:
        import diffusers as package
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError:
        return None
    wanted = source(FIXTURES / "diffusers_ddpm").get("version")
    if package.__version__ != wanted:
        print(f"  diffusers {package.__version__} is installed; the fixture was made by {wanted}")

    def run(path, inputs):
        unet = UNet2DModel.from_pretrained(path or FIXTURES / "diffusers_ddpm", subfolder="unet")
        with torch.no_grad():
            return {"out": unet.eval()(inputs["x"], inputs["steps"]).sample}

    def make(folder, gen):
        torch.manual_seed(SEED)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, resnet_time_scale_shift="default")
        perturb(unet, SEED)
        path = folder / "diffusers_ddpm"
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
        return path, {"x": torch.randn(2, 3, 8, 8, generator=gen), "steps": torch.tensor([0, 731])}

    return check_or_write("diffusers", write, run, make, "diffusers_io.pt")


# --- torchvision (PyPI): Bottleneck ResNet at width 4 ---------------------------------------------

def torchvision_resnet(write: Path | None) -> bool | None:
    """torchvision_resnet.pt: torchvision.models.resnet ResNet + Bottleneck, every stage at width 4"""
    packages()
    stand_in("torchvision._meta_registrations")  # compiled ops of the wheel; the ResNet classes are pure Python
    try:
        from torchvision.models.resnet import Bottleneck, ResNet
    except (ImportError, RuntimeError):
        return None

    def build():
        torch.manual_seed(SEED)
        model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=7)
        model.conv1 = nn.Conv2d(3, 4, kernel_size=7, stride=2, padding=3, bias=False)  # the stem at width 4
        model.bn1, model.inplanes = model._norm_layer(4), 4
        for i, planes in enumerate((4, 8, 16, 32)):  # each stage by its own _make_layer
            setattr(model, f"layer{i + 1}", model._make_layer(Bottleneck, planes, 1, stride=1 if i == 0 else 2))
        model.fc = nn.Linear(32 * Bottleneck.expansion, 7)
        return model

    def run(path, inputs):
        model = build()
        model.load_state_dict(torch.load(path or FIXTURES / "torchvision_resnet.pt", weights_only=True))
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            return {"logits": model.eval()((inputs["x"] - mean) / std)}

    def make(folder, gen):
        model = build()
        perturb(model, SEED)
        path = folder / "torchvision_resnet.pt"
        torch.save(model.state_dict(), path)
        return path, {"x": torch.rand(2, 3, 32, 32, generator=gen)}

    return check_or_write("torchvision_resnet", write, run, make)


GENERATORS = {"score_sde": score_sde, "robustbench_dmwrn": robustbench_dmwrn, "robustbench_wrn": robustbench_wrn,
              "paper_wrn": paper_wrn, "guided_diffusion": guided_diffusion, "edm": edm, "diffusers": diffusers,
              "torchvision_resnet": torchvision_resnet}

if __name__ == "__main__":
    main(GENERATORS, __doc__)
