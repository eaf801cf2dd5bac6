"""EDM SongUNet + its pickle reader and `ssni convert`; diffusers-layout DDPM folders.

The EDM pickles here are written the way EDM's ``torch_utils.persistence`` writes them:
each network object becomes a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
whose ``meta`` carries module source code, the class name and the object's ``__dict__``. The
source code we embed would create a marker file if it ever ran.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssni.checkpoints.edm_files import load_edm
from ssni.checkpoints.edm_pickle import read_edm_pickle
from ssni.checkpoints.public import load_public
from ssni.cli import app
from ssni.denoisers.edm import (EDMConfig, EDMDenoiser, SongUNet, SongUNetConfig, _Block, _Conv,
                                _FourierEmbedding, _GroupNorm, _Linear, _PositionalEmbedding)
from ssni.denoisers.protocol import EDMAdapter
from ssni.errors import CheckpointError

TINY_DDPMPP = SongUNetConfig(img_resolution=16, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                             attn_resolutions=(8,), augment_dim=9)
TINY_NCSNPP = SongUNetConfig(img_resolution=16, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                             attn_resolutions=(8,), embedding_type="fourier", channel_mult_noise=2,
                             encoder_type="residual", resample_filter=(1, 3, 3, 1), augment_dim=0)
TINY_SKIP = SongUNetConfig(img_resolution=16, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1,
                           attn_resolutions=(8,), encoder_type="skip", decoder_type="skip")
EDM_NAMES = {_Linear: "Linear", _Conv: "Conv2d", _GroupNorm: "GroupNorm", _Block: "UNetBlock",
             _PositionalEmbedding: "PositionalEmbedding", _FourierEmbedding: "FourierEmbedding",
             SongUNet: "SongUNet"}
PRECOND_NAMES = {"vp": "VPPrecond", "ve": "VEPrecond", "edm": "EDMPrecond"}


def _denoiser(cfg: EDMConfig, seed: int = 0) -> EDMDenoiser:
    torch.manual_seed(seed)
    net = EDMDenoiser(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-ish init would hide wiring errors
    return net.eval()


@pytest.fixture
def edm_modules(monkeypatch):
    """Importable stand-ins for ``torch_utils.persistence`` and ``dnnlib.util`` (what the writer names)."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the reader
        raise AssertionError("the reader must not call EDM's reconstruct function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = easy
    for name, module in (("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                         ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", util)):
        monkeypatch.setitem(sys.modules, name, module)
    return persistence, easy


def write_edm_pickle(path: Path, denoiser: EDMDenoiser, modules, marker: Path, **extra) -> None:
    """Pickle ``{'ema': ..., 'loss_fn': ..., ...}`` in EDM's persistent-class format."""
    persistence, easy = modules
    source = f"open({str(marker)!r}, 'w').write('code from the pickle ran')\n"
    cfg = denoiser.cfg

    class EDMPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, EDMDenoiser):
                name, kwargs = PRECOND_NAMES[cfg.precond], {
                    "img_resolution": cfg.unet.img_resolution, "img_channels": cfg.unet.in_channels,
                    "label_dim": cfg.unet.label_dim, "use_fp16": True, "model_type": "SongUNet",
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.unet.to_dict().items()
                       if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")},
                    **({"beta_d": 19.9, "beta_min": 0.1} if cfg.precond == "vp" else {})}
            elif type(obj) in EDM_NAMES:
                name, kwargs = EDM_NAMES[type(obj)], {}
            else:
                return NotImplemented
            state = {k: v for k, v in obj.__dict__.items() if k != "cfg"}
            if isinstance(obj, _Conv) and "resample_filter" not in state["_buffers"]:
                state["_buffers"] = {**state["_buffers"], "resample_filter": None}  # as EDM registers it
            if isinstance(obj, _Block):
                state["skip_scale"] = np.sqrt(0.5)  # a numpy scalar, as in EDM
            state.update(_init_args=(), _init_kwargs=easy(kwargs))
            meta = {"type": "class", "version": 6, "module_src": source, "class_name": name, "state": state}
            return persistence._reconstruct_persistent_obj, (meta,)

    data = {"ema": denoiser, "loss_fn": None, "augment_pipe": None,
            "dataset_kwargs": easy(path="datasets/cifar10-32x32.zip", xflip=False), **extra}
    with open(path, "wb") as handle:
        EDMPickler(handle, protocol=4).dump(data)


def _outputs(denoiser, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, denoiser.cfg.unet.in_channels, denoiser.cfg.unet.img_resolution,
                    denoiser.cfg.unet.img_resolution, generator=gen)
    with torch.no_grad():
        return denoiser(x, torch.tensor([0.02, 1.0, 40.0]))


def test_full_size_songunets_have_the_parameter_counts_edm_reports():
    # EDM (Karras et al., 2022), Table 7: DDPM++ 55.73M and NCSN++ 56.40M parameters on CIFAR-10.
    with torch.device("meta"):
        ddpmpp = EDMDenoiser(EDMConfig())
        ncsnpp = EDMDenoiser(EDMConfig(precond="ve", unet=SongUNetConfig(
            embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1))))
    assert sum(p.numel() for p in ddpmpp.parameters()) == 55_733_891
    assert sum(p.numel() for p in ncsnpp.parameters()) == 56_397_827
    state = ddpmpp.state_dict()
    assert state["model.map_augment.weight"].shape == (128, 9)
    assert state["model.enc.16x16_block0.qkv.weight"].shape == (768, 256, 1, 1)
    assert state["model.enc.16x16_down.conv0.resample_filter"].shape == (1, 1, 2, 2)
    assert state["model.dec.32x32_aux_conv.weight"].shape == (3, 256, 3, 3)
    assert "model.enc.32x32_block0.conv0.resample_filter" not in state  # only resampling convs have one


@pytest.mark.parametrize("precond,unet", [("vp", TINY_DDPMPP), ("ve", TINY_NCSNPP), ("edm", TINY_SKIP)])
def test_edm_pickle_is_read_without_running_its_code_and_converts_to_the_same_network(
        tmp_path, edm_modules, precond, unet):
    original = _denoiser(EDMConfig(unet=unet, precond=precond))
    marker = tmp_path / "ran.txt"
    write_edm_pickle(tmp_path / "net.pkl", original, edm_modules, marker)

    state, cfg = read_edm_pickle(tmp_path / "net.pkl")
    assert cfg == original.cfg and set(state) == set(original.state_dict())
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "net.pkl"), "--allow-pickle"])
    assert result.exit_code == 0, result.output
    converted = load_edm(tmp_path / "net.safetensors")
    assert torch.equal(_outputs(converted), _outputs(original))
    assert torch.equal(_outputs(load_edm(tmp_path / "net.pkl", allow_pickle=True)), _outputs(original))
    assert not marker.exists()


def test_the_registry_loads_a_converted_edm_model_as_an_eps_model(tmp_path, edm_modules):
    original = _denoiser(EDMConfig(unet=TINY_DDPMPP))
    write_edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", original, edm_modules, tmp_path / "ran")
    with pytest.raises(CheckpointError, match="--allow-pickle"):  # the original .pkl needs the opt-in
        load_public("cifar10-edm-uncond-vp", tmp_path)
    assert isinstance(load_public("cifar10-edm-uncond-vp", tmp_path, allow_pickle=True), EDMAdapter)

    CliRunner().invoke(app, ["convert", str(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"), "--allow-pickle"])
    model = load_public("cifar10-edm-uncond-vp", tmp_path)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(model(x, t), EDMAdapter(original)(x, t))


def test_convert_refuses_without_the_opt_in_and_names_foreign_globals(tmp_path, edm_modules):
    write_edm_pickle(tmp_path / "net.pkl", _denoiser(EDMConfig(unet=TINY_DDPMPP)), edm_modules, tmp_path / "ran")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "net.pkl")])
    assert result.exit_code != 0 and not (tmp_path / "net.safetensors").exists()
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_edm(tmp_path / "net.pkl")

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"ema": Evil()}, handle)
    with pytest.raises(CheckpointError, match="system"):
        read_edm_pickle(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


def test_numpy_scalars_of_object_dtype_are_refused(tmp_path):
    from numpy._core.multiarray import scalar

    class ObjectScalar:  # bytes read through an object dtype would become pointers
        def __reduce__(self):
            return scalar, (np.dtype("O"), b"\0" * 8)

    with open(tmp_path / "obj.pkl", "wb") as handle:
        pickle.dump({"ema": ObjectScalar()}, handle)
    with pytest.raises(CheckpointError, match="not allowed"):
        read_edm_pickle(tmp_path / "obj.pkl")


def test_truncated_or_foreign_edm_files_give_clear_errors(tmp_path, edm_modules):
    write_edm_pickle(tmp_path / "net.pkl", _denoiser(EDMConfig(unet=TINY_DDPMPP)), edm_modules, tmp_path / "ran")
    data = (tmp_path / "net.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_edm_pickle(tmp_path / "cut.pkl")
    with open(tmp_path / "empty.pkl", "wb") as handle:
        pickle.dump({"loss_fn": None}, handle)
    with pytest.raises(CheckpointError, match="no EDM network"):
        read_edm_pickle(tmp_path / "empty.pkl")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="edm_config"):
        load_edm(tmp_path / "plain.safetensors")


def test_class_conditional_edm_networks_are_refused_for_purification(tmp_path, edm_modules):
    cond = _denoiser(EDMConfig(unet=SongUNetConfig(**{**TINY_DDPMPP.to_dict(), "label_dim": 10})))
    write_edm_pickle(tmp_path / "cond.pkl", cond, edm_modules, tmp_path / "ran")
    assert read_edm_pickle(tmp_path / "cond.pkl")[1].unet.label_dim == 10
    with pytest.raises(CheckpointError, match="class-conditional"):
        load_edm(tmp_path / "cond.pkl", allow_pickle=True)


def test_vp_preconditioning_maps_sigma_back_to_edm_time():
    net = EDMDenoiser(EDMConfig(unet=TINY_DDPMPP))
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    sigma = ((0.5 * 19.9 * t ** 2 + 0.1 * t).exp() - 1).sqrt()  # EDM's VP sigma(t)
    assert torch.allclose(net.sigma_inv(sigma), t)
