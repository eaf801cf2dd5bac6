"""The run's runtime policy, in one place: device, precision, per-sample tensors, memory errors.

- **Device.** ``"auto"`` (the default) is ``cuda`` when torch sees a GPU, else ``cpu``; a named
  device is checked before anything loads, so a machine without it gets one clear error.
  Under ``torchrun`` a bare ``cuda`` is the process's ``cuda:LOCAL_RANK``.
- **Per-sample tensors.** A batch's images, labels and ids are put on the run's device by
  :func:`on_device` when it is made; levels, masks and draws are made there. Attacks and the
  defense keep the ids where they are given and derive the noise seeds on that device (exact
  int64 arithmetic: the same seeds everywhere). Values go back to the host only where a host
  decision needs them: the levels a join-scheduled purification plans its calls from (once per
  purification with SSNI), the transfer attack's ids (its fixed levels are looked up by id), a
  check at a public boundary, and a finished batch's rows.
- **Precision.** ``fp32`` is real fp32: TensorFloat-32 is off for convolutions and matrix
  products (cuDNN would otherwise run fp32 convolutions in TF32, which moved score norms by up
  to 8.4e-4 relative on an H100 and changed 27 of 40 clean levels). ``tf32`` and ``bf16``
  (autocast of the networks) are opt-in speed modes whose measured effect is recorded beside
  the results (``benchmarks/``). On a CPU ``tf32`` computes exactly what ``fp32`` does.
- **Memory.** A batch that runs out of device memory is retried at half the rows
  (:func:`smaller_after_oom`); when one row does not fit the run stops with one
  :class:`ssni.errors.ResourceError` that says what to change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import ConfigError, ResourceError

PRECISIONS = ("fp32", "tf32", "bf16")
CPU = torch.device("cpu")
T = TypeVar("T")
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a run uses, checked against this machine (:class:`ConfigError` if it lacks it)."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(name)!r}; use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"device {str(name)!r} is not supported; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"device {str(name)!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"{build}, {torch.cuda.device_count()} GPU(s) visible); use device cpu or auto "
                          '(--device cpu on the command line, evaluate.device = "cpu" in a config)')
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def describe_device(device: torch.device, precision: str = "fp32") -> str:
    """One line for the first output of a command: which device and precision a run uses."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, torch {torch.__version__}"
    else:
        what = f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    return f"device: {device} ({what}); precision {precision}"


def on_device(device: torch.device, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The one place a batch's per-sample tensors move to the run's device."""
    return tuple(t.to(device) for t in tensors)


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """Run the block at ``precision`` (see the module docstring); the previous TF32 flags come back after."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}; choose one of {list(PRECISIONS)}")
    saved = _tf32_flags()
    _set_tf32(precision == "tf32")
    try:
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        _set_tf32(*saved)


def _precision_strings() -> bool:
    """Whether this torch sets TF32 by per-backend ``fp32_precision`` strings (torch >= 2.9), which
    refuse a mix with the older ``allow_tf32`` booleans: the one place that picks the interface."""
    return (getattr(torch.backends.cudnn, "conv", None) is not None
            and hasattr(torch.backends.cuda.matmul, "fp32_precision"))


def _tf32_flags() -> tuple:
    if _precision_strings():
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def _set_tf32(conv: bool | str, matmul: bool | str | None = None) -> None:
    """TF32 on (``True``) or off (``False``) for cuDNN convolutions and CUDA matmuls, or the saved flags,
    through the one interface this torch has (:func:`_precision_strings`)."""
    matmul = conv if matmul is None else matmul
    if _precision_strings():
        as_text = lambda v: v if isinstance(v, str) else ("tf32" if v else "ieee")  # noqa: E731
        torch.backends.cudnn.conv.fp32_precision = as_text(conv)
        torch.backends.cuda.matmul.fp32_precision = as_text(matmul)
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = bool(conv), bool(matmul)


OOM_TEXTS = ("out of memory", "can't allocate memory")  # CUDA and other backends; the CPU allocator


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure: CUDA's ``OutOfMemoryError``, the same text from another backend, or the
    CPU allocator's ``DefaultCPUAllocator: can't allocate memory`` (a plain ``RuntimeError``)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower() for text in OOM_TEXTS)


def unless_out_of_memory(fn: Callable[..., T], *args) -> T | None:
    """``fn(*args)``, or ``None`` when it runs out of memory (:func:`is_out_of_memory`; other errors
    propagate). The handler is left before returning, so the failed call's tensors can be freed."""
    try:
        return fn(*args)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
    return None


def halving_on_oom(fn: Callable[[int], T], rows: int, device: torch.device,
                   said: Callable[[int, int], object] | None = None) -> tuple[T, int]:
    """``(fn(rows), rows)`` at the first ``rows`` that fits: after each out-of-memory error ``rows``
    halves (:func:`smaller_after_oom`: a :class:`ResourceError` at one row) and ``said(rows, half)``
    hears of it. The one retry rule of the run, the plan and ``"auto"``."""
    while True:
        out = unless_out_of_memory(fn, rows)
        if out is not None:
            return out, rows
        half = smaller_after_oom(rows, device)
        if said is not None:
            said(rows, half)
        rows = half


def smaller_after_oom(rows: int, device: torch.device) -> int:
    """Half of ``rows`` after an out-of-memory error (cached blocks freed); at one row, a
    :class:`ResourceError` that says what else lowers memory. Speed-only: results do not depend on it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if rows <= 1:
        free = f" ({torch.cuda.mem_get_info(device)[0] / 2 ** 30:.1f} GiB free)" if device.type == "cuda" else ""
        raise ResourceError(f"one sample does not fit in the memory of {device}{free}: set purifier.checkpoint = true, "
                            "a smaller evaluate.max_rows and eot_batch = 1, or another device; `ssni evaluate --plan` "
                            "with the same config prints the largest batch and max_rows that fit")
    return rows // 2


def _packets(*names: str) -> frozenset:
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


# ops whose result on the host (a Python value) or whose output size depends on tensor values: each
# one waits for the device's queue
_READ_OPS = _packets("_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "nonzero_numpy",
                     "argwhere", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                     "unique_dim_consecutive", "bincount")
_INDEX_OPS = _packets("index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_",
                      "_unsafe_index_put")  # a boolean index is a nonzero: its count sizes the output


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values back to the host while active, each of which waits for the
    device's queue: scalar reads (``.item()``, ``bool``/``int``/``float`` of a tensor, ``if tensor``,
    ``torch.equal``, ``is_nonzero``, ``allclose``), ops whose output size depends on the values
    (``nonzero``, ``torch.where(mask)``, ``masked_select``, ``unique``, ``repeat_interleave`` without
    ``output_size``, and indexing with a boolean mask: ``x[mask]``, ``x[mask] = v``), copies from an
    accelerator to the CPU, and ``tolist``/``numpy`` (which bypass the dispatcher). On a CPU the same
    calls are counted, so a CPU test sees the reads a GPU run would make."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._patched: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += _reads(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(Tensor, name)
            self._patched[name] = original

            def counted(tensor, *a, _original=original, **k):
                self.count += 1
                return _original(tensor, *a, **k)

            setattr(Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(Tensor, name, original)
        return super().__exit__(*exc)


def _reads(func, args: tuple, kwargs: dict) -> int:
    """1 when the op ``func(*args, **kwargs)`` reads values back to the host (:class:`HostReads`), else 0."""
    packet = func.overloadpacket
    if packet in _READ_OPS:
        return 1
    if packet in _INDEX_OPS:  # x[mask], x[mask] = v: the mask's nonzero
        return int(any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()))
    if packet is torch.ops.aten.repeat_interleave:  # counts as a tensor: the output's size is their sum
        return int(isinstance(args[0], Tensor) and (len(args) < 2 or isinstance(args[1], Tensor))
                   and kwargs.get("output_size") is None)
    if func is torch.ops.aten._to_copy.default:  # .cpu(), .to("cpu") of an accelerator's tensor
        target = kwargs.get("device")
        return int(_on_accelerator(args[0]) and target is not None and torch.device(target).type == "cpu")
    if func is torch.ops.aten.copy_.default:  # cpu_tensor.copy_(accelerator_tensor)
        return int(args[0].device.type == "cpu" and _on_accelerator(args[1]))
    return 0


def _on_accelerator(t: object) -> bool:
    return isinstance(t, Tensor) and t.device.type not in ("cpu", "meta")


def count_host_reads(fn) -> int:
    """How many times ``fn()`` reads tensor values back to the host (:class:`HostReads`)."""
    with HostReads() as reads:
        fn()
    return reads.count


def bucket_width(rows: int) -> int:
    """The width a call of ``rows`` rows is padded to when compiled: exact up to 8, then the next
    multiple of a quarter of the power of two below (under 25% padding; 4 widths per doubling, so a
    few dozen shapes up to thousands of rows)."""
    if rows <= 8:
        return rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


class BucketedNetwork(torch.nn.Module):
    """``net(x, *per_row)`` on rows padded to :func:`bucket_width` (copies of the first row), sliced back.

    A compiled network then sees a small fixed set of batch shapes however the join scheduler's
    row counts vary, so static-shape kernels (and CUDA graphs) are built a few times, not once per
    count. Rows are independent in eval mode, so the real rows' outputs do not change (up to a
    kernel's choice for another batch size, which can move float32 results in their last bits)."""

    def __init__(self, net: torch.nn.Module, compiled: torch.nn.Module | None = None):
        super().__init__()
        self.net = net  # the parameters live here, so .to() and state_dict() see the plain network
        self.compiled = [compiled if compiled is not None else net]  # a list: not registered as a submodule

    def __getattr__(self, name: str):
        """An attribute the wrapper lacks is the wrapped network's (``image_size``, ``config``,
        ``schedule``, ...): code that reads a network's attributes sees the same ones compiled or not."""
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (``net``)
        except AttributeError:
            net = self.__dict__.get("_modules", {}).get("net")
            if net is None:
                raise
            return getattr(net, name)

    def forward(self, x: Tensor, *per_row: Tensor) -> Tensor:
        rows = x.shape[0]
        width = bucket_width(rows)
        if width == rows:
            return self.compiled[0](x, *per_row)
        pad = [0] * (width - rows)
        padded = [torch.cat([v, v[pad]]) for v in (x, *per_row)]
        return self.compiled[0](*padded)[:rows]


def compile_network(net: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """``net`` compiled for static shapes (``mode``: torch.compile's, e.g. ``"reduce-overhead"`` for CUDA
    graphs), behind :class:`BucketedNetwork`. The recompile limit is raised to the number of widths a
    run can see, so no width falls back to eager."""
    import torch._dynamo

    limit = len({bucket_width(k) for k in range(1, 1 << 14)}) + 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return BucketedNetwork(net, torch.compile(net, dynamic=False, mode=mode))
