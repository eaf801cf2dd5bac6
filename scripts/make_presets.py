"""Write the paper presets into configs/ (run from the repository root: python scripts/make_presets.py).

Settings restate the paper's protocol (METHOD §4): CIFAR-10 with the score-SDE VP
DDPM++ model and RobustBench WRN-28-10 / WRN-70-16, 512 fixed test images,
PGD+EOT (200 iterations, step 0.007 sign steps, EOT 20, no random start) at
l_inf 8/255 and l_2 0.5; ImageNet-1K with the 256x256 guided-diffusion model and
ResNet-50 at l_inf 4/255. Gradients are exact through the defense (activation
checkpointing), not the paper's 20-step surrogate: see docs/method.md.
"""

from pathlib import Path

METHODS = {
    "diffpure": {"linf": 'method = "diffpure"\nt_star = 100\nsteps = 100',
                 "l2": 'method = "diffpure"\nt_star = 75\nsteps = 75'},
    "gdmp": 'method = "gdmp"\nt_star = 36\nrounds = 4\nguide_scale = 60000.0\nsteps = 0  # unit DDPM steps',
    "gns": 'method = "gns"\nlevels = [30, 30, 30, 30, 50, 50, 125, 125]\nsteps = 0  # full denoising\nvotes = 10',
}
THREATS = {"linf": ("linf", 8 / 255), "l2": ("l2", 0.5)}
CLASSIFIERS = {"wrn28": "cifar10-wrn-28-10", "wrn70": "cifar10-wrn-70-16"}


def preset(title, data, models, purifier, ssni, n_levels, norm, eps, calibration_size):
    return f"""# {title}
# Paper protocol (METHOD.md section 4); exact gradients through the whole defense.
# ssni evaluate --config <this file> --weights-dir DIR --out runs/<name> [--set evaluate.seed=122]
[data]
{data}

[models]
{models}

[purifier]
{purifier}

[ssni]
reweight = "{ssni}"
n_levels = {n_levels}
bias = 5
calibration_size = {calibration_size}

[[attacks]]
name = "pgd"
norm = "{norm}"
eps = {eps!r}
steps = 200
step_size = 0.007
eot = 20
random_start = false
sign_step = true

[evaluate]
device = "cuda"
seed = 121
batch_size = 16
rescore = "single"
"""


def main() -> None:
    out = Path("configs")
    cifar_data = 'dataset = "cifar10"\nsplit = "test"\nn = 512\nroot = "data/cifar-10-batches-py"'
    for arch, classifier in CLASSIFIERS.items():
        for method, settings in METHODS.items():
            for threat, (norm, eps) in THREATS.items():
                purifier = settings[threat] if isinstance(settings, dict) else settings
                for ssni in ("none", "linear", "sigmoid"):
                    tag = {"none": "base", "linear": "ssni-l", "sigmoid": "ssni-n"}[ssni]
                    name = f"cifar10-{arch}-{method}-{tag}-{threat}"
                    models = f'diffusion = "cifar10-ddpmpp-deep-vp"\nclassifier = "{classifier}"'
                    text = preset(f"{name}: {method} {tag} on {classifier}, {threat} {eps:.4f}", cifar_data,
                                  models, purifier, ssni, 20, norm, eps, 5000)
                    (out / f"{name}.toml").write_text(text)
    imagenet_data = 'dataset = "imagenet"\nsplit = "test"\nn = 512\nroot = "data/imagenet"'
    for ssni in ("none", "linear", "sigmoid"):
        tag = {"none": "base", "linear": "ssni-l", "sigmoid": "ssni-n"}[ssni]
        name = f"imagenet-resnet50-diffpure-{tag}-linf"
        models = 'diffusion = "imagenet-256-uncond"\nclassifier = "imagenet-resnet50"'
        purifier = 'method = "diffpure"\nt_star = 150\nsteps = 150\nresolution = 256'
        text = preset(f"{name}: DiffPure {tag} on ResNet-50, linf 4/255", imagenet_data, models, purifier, ssni,
                      50, "linf", 4 / 255, 5000)
        (out / f"{name}.toml").write_text(text)


if __name__ == "__main__":
    main()
