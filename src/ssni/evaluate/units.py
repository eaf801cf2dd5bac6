"""Per-row units of a plan, measured on the device: seconds of one reverse step and of the
classifier (inference, with gradient, checkpointed) and the bytes they hold (the cost model in
:mod:`ssni.evaluate.costs` counts a run in them; ``--plan`` and ``"auto"`` measure them). The timer
(:func:`best_time`, :func:`sync`) is also ``ssni bench``'s."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..defense import Defense
from ..diffusion import with_trusted_levels


def best_time(fn, repeats: int = 3, warmup: bool = True) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call unless ``warmup=False``), the
    device's queue drained before and after each."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def sync() -> None:
    """Wait for CUDA's queue (when CUDA is in use), so a timer measures the work, not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def saved_bytes(fn, held: nn.Module | None = None) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs (distinct storages, counted once), less
    the parameters and buffers of ``held``, which are in memory anyway (a convolution saves its weight)."""
    seen: dict[int, int] = {}
    resident = set() if held is None else {t.untyped_storage().data_ptr()
                                          for t in (*held.parameters(), *held.buffers())}

    def pack(t: Tensor):
        if t.untyped_storage().data_ptr() not in resident:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class _LiveBytes(TorchDispatchMode):
    """Counts the storages that ops create and that are alive at once (freed with their last tensor)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # address -> [bytes, tensors alive that use it]
        self.seen = WeakIdKeyDictionary()
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outside = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t not in self.seen:
                self._track(t, outside)
        return out

    def _track(self, t: Tensor, outside: set[int]) -> None:
        key = t.untyped_storage().data_ptr()
        if key not in self.storages:
            if key == 0 or key in outside:  # empty, or a view of a tensor made before the count began
                return
            self.storages[key] = [t.untyped_storage().nbytes(), 0]
            self.now += self.storages[key][0]
            self.peak = max(self.peak, self.now)
        self.storages[key][1] += 1
        self.seen[t] = True
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.storages[key]


def peak_live_bytes(fn, device: torch.device) -> int:
    """Most bytes of tensors that ``fn()`` creates and holds at the same time (an inference pass's
    activations): the allocator's peak on CUDA, else counted op by op (kernels' own scratch unseen)."""
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - before
    count = _LiveBytes()
    with count:
        fn()
    return count.peak


@dataclass
class Units:
    """Per-row seconds and bytes measured on the device (see the module docstring)."""

    step: float
    step_grad: float
    step_ck: float
    classifier: float
    classifier_grad: float
    step_saved_bytes: float
    step_input_bytes: float
    classifier_saved_bytes: float
    weight_bytes: int
    cuda_step_peak_bytes: float | None = None
    step_live_bytes: float = 0.0  # most bytes one inference step holds at once, per row


def _step_fn(model: Defense, x: Tensor, rows: int):
    """``(inputs in model scale, one reverse step of them)`` for ``rows`` rows cycled from ``x``."""
    from ..rng import SampleNoise

    x_model = 2 * x[torch.arange(rows) % x.shape[0]] - 1
    purifier, noise = model.purifier, SampleNoise.from_ids(0, range(rows))
    a = torch.full((rows,), max(purifier.t_stars), device=x.device)
    idx = torch.arange(rows, device=x.device)
    step = with_trusted_levels(purifier.reverse_step)  # levels checked here once, as a purification does
    return x_model, lambda z: step(z, a, (a - 1).clamp_min(0), idx, noise=noise, round_=0, x_orig=x_model)


def measure_units(model: Defense, x: Tensor, rows: int, grad_rows: int, repeats: int = 3) -> Units:
    """Time one reverse step and the classifier at ``rows`` rows (inference) and ``grad_rows`` rows
    (forward + backward: the attack's rows, ``eot_batch x batch``)."""
    from torch.utils.checkpoint import checkpoint

    from ..defense import resize

    x_inf, step_inf = _step_fn(model, resize(x, model.resolution), rows)
    x_model, step = _step_fn(model, resize(x, model.resolution), grad_rows)
    x_cls, x_cls_grad = x[torch.arange(rows) % x.shape[0]], x[torch.arange(grad_rows) % x.shape[0]]

    def grad_of(fn):
        def run():
            z = x_model.detach().requires_grad_(True)
            torch.autograd.grad(fn(z).square().sum(), z)
        return run

    with torch.no_grad():
        t_step = best_time(lambda: step_inf(x_inf), repeats)
        t_cls = best_time(lambda: model.classifier(x_cls), repeats)
        live = peak_live_bytes(lambda: step_inf(x_inf), x.device) / rows
    t_grad = best_time(grad_of(step), repeats)
    t_ck = best_time(grad_of(lambda z: checkpoint(step, z, use_reentrant=False)), repeats)
    t_cls_grad = best_time(lambda: torch.autograd.grad(model.classifier(x_cls_grad.requires_grad_(True)).sum(),
                                                   x_cls_grad), repeats)
    z = x_model.detach().requires_grad_(True)
    peak = None
    if x.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        step(z)  # the peak is read from the allocator; the output itself is not needed
        peak = (torch.cuda.max_memory_allocated(x.device) - before) / grad_rows
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    g = grad_rows
    return Units(t_step / rows, t_grad / g, t_ck / g, t_cls / rows, t_cls_grad / g,
                 saved_bytes(lambda: step(z), model) / g, x_model[0].numel() * x_model.element_size(),
                 saved_bytes(lambda: model.classifier(x_cls_grad), model) / g, weights, peak, live)
