"""Read the tensors of an EDM network pickle without running the code it carries.

EDM (NVlabs/edm) saves networks with ``pickle.dump`` of live objects whose classes use
``torch_utils.persistence``: each object is stored as a call
``_reconstruct_persistent_obj(meta)`` where ``meta`` holds the *source code* of the module
that defined the class, the class name and the object's ``__dict__``. The original loader
``exec``s that source. We never do: a restricted unpickler maps that call to an inert
record (class name + state), rebuilds tensors with torch's own safe rebuild functions,
and refuses every other global. From the records we take the state dict (parameters
and persistent buffers, walked like ``nn.Module.state_dict``) and the constructor
arguments that persistence recorded (``_init_kwargs``), which give the architecture.

The user still opts in (``--allow-pickle``), because a pickle is a program: this reader
bounds what it may call to a short list, but it was written for EDM's files, not audited
against every crafted stream.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..denoisers.edm import EDMConfig


@dataclass
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, without building it."""

    class_name: str
    state: dict = field(default_factory=dict)


class _PlainModule:
    """Inert stand-in for a ``torch.nn`` container (``ModuleDict``, ...): keeps its ``__dict__``."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


def _persistent_record(meta: dict) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise CheckpointError("unexpected persistent-object record in the EDM pickle")
    return PersistentRecord(str(meta["class_name"]), dict(meta.get("state") or {}))


def _storage_from_bytes(data: bytes):
    """A tensor storage, read by torch's safe loader; anything else in its bytes is refused in one line."""
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of the inner pickle; say nothing
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        text = str(err).split("WeightsUnpickler error:")[-1].strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise CheckpointError(f"a tensor storage in the pickle is not plain tensor data (torch's safe loader "
                              f"refused it: {reason}); nothing in it was run") from None


def _parameter(data: Tensor, *_args) -> Tensor:
    return data


class _DTypeName:
    """Inert stand-in for ``numpy.dtype(name, ...)``: keeps the name and byte order, ignores the rest.

    A real ``np.dtype`` would accept any pickled state (object fields included), and reading
    bytes through such a dtype could turn file contents into object pointers.
    """

    def __init__(self, name, *_args):
        self.name, self.order = str(name), "="

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]


def _numpy_scalar(dtype: _DTypeName, data: bytes | None = None):
    """A plain number from a pickled numpy scalar (booleans, integers, floats, complex only)."""
    if not isinstance(dtype, _DTypeName) or not isinstance(data, bytes):
        raise CheckpointError("unexpected numpy scalar in the EDM pickle")
    try:
        real = np.dtype(dtype.name)
    except TypeError as err:
        raise CheckpointError(f"unknown numpy dtype {dtype.name!r} in the EDM pickle") from err
    if real.kind not in "biufc" or len(data) != real.itemsize:
        raise CheckpointError(f"numpy scalar of dtype {dtype.name!r} ({len(data)} bytes) is not allowed")
    if dtype.order in "<>":
        real = real.newbyteorder(dtype.order)
    return np.frombuffer(data, dtype=real)[0].item()


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _DTypeName,
    ("dnnlib.util", "EasyDict"): dict,
}


class _EDMUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith("torch.nn.modules."):
            return _PlainModule
        raise CheckpointError(f"the pickle calls {module}.{name}, which the EDM reader does not allow; "
                              "it is not an EDM network pickle, or one of an unknown version")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("the pickle uses persistent ids (torch.save format?); load it as a torch file")


def _module_state(node: Any) -> dict:
    if isinstance(node, (PersistentRecord, _PlainModule)):
        return node.state
    raise CheckpointError(f"expected a network module in the EDM pickle, found {type(node).__name__}")


def state_dict_of(node: Any, prefix: str = "") -> dict[str, Tensor]:
    """``nn.Module.state_dict()`` of an unpickled record tree: parameters, persistent buffers."""
    state = _module_state(node)
    skipped = set(state.get("_non_persistent_buffers_set") or ())
    tensors: dict[str, Tensor] = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            tensors[prefix + name] = value.detach().clone()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skipped:
            tensors[prefix + name] = value.detach().clone()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(state_dict_of(child, f"{prefix}{name}."))
    return tensors


_PRECONDS = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm"}


def edm_config_of(record: PersistentRecord):
    """The :class:`~ssni.denoisers.edm.EDMConfig` a persistent ``*Precond`` record was built with."""
    from ..denoisers.edm import EDMConfig, SongUNetConfig

    if record.class_name not in _PRECONDS:
        raise CheckpointError(f"the network is a {record.class_name}; only {sorted(_PRECONDS)} are supported")
    kwargs = dict(record.state.get("_init_kwargs") or {})
    args = tuple(record.state.get("_init_args") or ())
    for key, value in zip(("img_resolution", "img_channels"), args):
        kwargs.setdefault(key, value)
    model_type = kwargs.pop("model_type", "SongUNet" if record.class_name != "EDMPrecond" else "DhariwalUNet")
    if model_type != "SongUNet":
        raise CheckpointError(f"the network's model_type is {model_type}; only SongUNet (DDPM++/NCSN++) "
                              "is implemented")
    channels = kwargs.pop("img_channels", 3)
    recorded = {key: kwargs.pop(key) for key in list(kwargs) if key in SongUNetConfig.__dataclass_fields__}
    unet = {**_SONGUNET_CLASS_DEFAULTS, **{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()},
            "in_channels": channels, "out_channels": channels}
    for name in ("use_fp16", "label_dropout", "sigma_min", "sigma_max", "epsilon_t"):
        kwargs.pop(name, None)  # no effect on float32 inference
    precond = {k: kwargs.pop(k) for k in ("beta_d", "beta_min", "M", "sigma_data") if k in kwargs}
    if kwargs:
        raise CheckpointError(f"the network was built with arguments the reader does not know: {sorted(kwargs)}")
    return EDMConfig(unet=SongUNetConfig(**unet), precond=_PRECONDS[record.class_name], **precond)


# SongUNet's constructor defaults where they differ from SongUNetConfig's CIFAR-10 ones: a pickle
# records only the arguments EDM's training script passed.
_SONGUNET_CLASS_DEFAULTS = {"augment_dim": 0, "channel_mult": (1, 2, 2, 2), "dropout": 0.10}


def read_edm_pickle(path: Path, key: str = "ema"):
    """Return ``(state_dict, EDMConfig)`` of the network stored under ``key`` in an EDM pickle."""
    try:
        with open(path, "rb") as handle:
            data = _EDMUnpickler(handle).load()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a readable EDM pickle ({type(err).__name__}: {err}); "
                              "it may be truncated: download it again") from err
    record = data.get(key) if isinstance(data, dict) else data
    if not isinstance(record, PersistentRecord):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} holds no EDM network under {key!r} (found {found})")
    return state_dict_of(record, ""), edm_config_of(record)


def read_edm_network(path: Path, allow_pickle: bool) -> tuple[dict[str, Tensor], EDMConfig]:
    """``(state dict, config)`` of an EDM ``.pkl``, refused without the explicit opt-in: the file
    embeds Python source code (none of it is run here, but a pickle is still a program)."""
    if not allow_pickle:
        raise CheckpointError(f"{path} is an EDM pickle, which embeds Python source code; it is read only "
                              "with --allow-pickle (no code in it is run), or convert it once with "
                              "`ssni convert` and load the .safetensors file it writes")
    return read_edm_pickle(path)


def convert_edm_pickle(source: Path, target: Path) -> str:
    """Write the EMA network of an EDM pickle as safetensors (config in its metadata); return its sha256."""
    from ..denoisers.edm import EDMDenoiser
    from ..weights_io import match_state_dict, save_weights

    state, cfg = read_edm_pickle(source)
    denoiser = EDMDenoiser(cfg)
    match_state_dict(denoiser, state, str(source))
    return save_weights(target, denoiser, {"edm_config": cfg.to_dict(), "converted_from": source.name})


__all__ = ["PersistentRecord", "convert_edm_pickle", "read_edm_network", "edm_config_of", "read_edm_pickle", "state_dict_of"]
