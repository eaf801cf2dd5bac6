"""Per-sample randomness: every draw is a function of (sample seed, purpose key, level).

No global RNG is touched. Sample ``i`` gets a seed derived from
``(run seed, sample id, draw)``; each random tensor it needs is then generated
from ``(that seed, key)``, where the key names the purpose (forward noise of
round ``r``, reverse noise at level ``a``, score-norm level ``k``...). So a
sample's result does not depend on batch size, order, partners, sharding, on
which reverse steps a scheduler skips, or on whether a run was resumed.

The generator is counter based and vectorised: a whole batch is drawn in a
fixed number of tensor ops on the tensor's own device (no per-row loop, no
host round trip). Row ``j`` has key ``k_j = SplitMix64(seed_j ^ code(key))``
(:meth:`SampleNoise.randn`) or ``SplitMix64(seed_j ^ level_j ^ code(key))``
(:meth:`SampleNoise.randn_levels`); its ``p``-th pair of values is

    h = SplitMix64(k_j + p * gamma)                     (64 bits, int64 ops)
    u = (h_hi' + 1/2) / 2^32,  theta = 2 pi h_lo / 2^32  (h_hi' = high 32 bits, top bit flipped)
    z = sqrt(-2 ln u) * (cos theta, sin theta)           (Box-Muller)

with the first half of the row taking the cosines and the second the sines.
The hash uses exact int64 arithmetic (wraparound multiply, shifts masked to
be logical); ``cos``/``sin`` come from a 2^16-entry table plus a first-order
correction in float32 ``*``, ``+``, ``-`` (error under 5e-9); ``ln`` runs in
float64 on an exact ``u``; ``sqrt`` and the rest are correctly rounded float32
ops, one kernel each. CPU and CUDA agree to about one float32 ulp of the value, not
bitwise: on an H100 (torch 2.11, CUDA 13) 0.59% of the values of a 64x3x32x32 draw
differed from the CPU's, by at most 4.8e-7 (the test's bound: 1% of the values, two
ulps each). Results that depend on the noise agree within float rounding across
devices, as they do across batch sizes; decisions near a boundary can flip. A
compiler that fuses these ops (torch.compile) may move values by a few ulps, which
is why only the networks are compiled. Values are computed in float32 and cast to
``like``'s dtype, so a float64 draw equals the float32 draw cast up. On the
CPU, large tensors are drawn in cache-sized blocks (:func:`_blocks`);
elsewhere in one pass of a fixed number of ops, whatever the batch.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from .errors import InputError

# Draw indices by purpose (an evaluation and its checks use the same): the clean pass, attack k from
# (k + 1) * ATTACK_DRAW on (its EOT draws follow), the r-th fresh re-scoring draw RESCORE_DRAW + r.
CLEAN_DRAW = 0
ATTACK_DRAW = 1_000_000
RESCORE_DRAW = 1_000_000_000

_MASK = (1 << 64) - 1
_TABLE_BITS = 16
CPU_BLOCK = 1 << 17  # pairs per CPU block (1 MiB of int64): big draws stay in cache, ops still span 2 threads
_TABLES: dict[torch.device, tuple[Tensor, Tensor]] = {}
_HIGH = 1 if sys.byteorder == "little" else 0  # which int32 of an int64 holds its high bits


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


_GAMMA, _MUL1, _MUL2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
# 2 pi / 2^32 rounded to float32: exact in any precision, so no device rounds it differently.
_ANGLE_UNIT = float(torch.tensor(2 * math.pi / 2 ** 32, dtype=torch.float32))


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def derive_seed(*parts: int | str) -> int:
    """Mix integers and strings into one 63-bit seed (stable across runs and machines)."""
    state = 0
    for part in parts:
        as_int = zlib.crc32(part.encode()) if isinstance(part, str) else int(part)
        state = _splitmix64(state ^ (as_int & _MASK))
    return state >> 1


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic: mask the sign copies)."""
    return torch.bitwise_right_shift(z, bits).bitwise_and_((1 << (64 - bits)) - 1)


def _finalise_(z: Tensor) -> Tensor:
    """SplitMix64's output function on an int64 tensor, in place (bit-identical to the int version)."""
    z.bitwise_xor_(_shr(z, 30)).mul_(_MUL1)
    z.bitwise_xor_(_shr(z, 27)).mul_(_MUL2)
    return z.bitwise_xor_(_shr(z, 31))


def _mix(z: Tensor, part: int | Tensor) -> Tensor:
    """``_splitmix64(z ^ part)`` elementwise on int64 tensors (a new tensor)."""
    part = _signed(part) if isinstance(part, int) else part
    return _finalise_(torch.bitwise_xor(z, part).add_(_GAMMA))


def batch_ids(x: Tensor, sample_ids: Tensor | Sequence[int] | None, cpu: bool = False) -> Tensor:
    """``[B]`` ids of the rows of ``x``: ``sample_ids`` as a tensor, or the positions ``0..B-1`` (on ``x``'s
    device) when ``None``.

    Given ids stay on their own device (a run's are on its device), where :func:`sample_seeds` derives
    the seeds (exact int64 arithmetic: the same seeds on every device); ``cpu=True`` moves them to the
    host, for code that looks samples up by id in Python (the transfer attack's fixed levels)."""
    if sample_ids is None:
        return torch.arange(x.shape[0], device=x.device)
    ids = torch.as_tensor(sample_ids)
    return ids.cpu() if cpu else ids


def sample_seeds(run_seed: int, sample_ids: Tensor | Sequence[int], draw: int | Sequence[int] | Tensor = 0) -> Tensor:
    """One seed per sample, ``[B]`` int64, equal to ``derive_seed(run_seed, id, draw)``; ``draw`` may be per sample.

    Vectorised on the ids' device (CPU for sequences).
    """
    ids = torch.as_tensor(sample_ids, dtype=torch.int64)
    draws = torch.as_tensor(draw, dtype=torch.int64, device=ids.device)
    if ids.dim() != 1 or draws.dim() > 1 or (draws.dim() == 1 and draws.shape != ids.shape):
        raise InputError(f"sample_seeds needs [B] sample ids and one draw or [B] draws; found ids of shape "
                         f"{tuple(ids.shape)} and draws of shape {tuple(draws.shape)}: pass one draw per sample")
    state = _mix(ids, _splitmix64(run_seed & _MASK))
    return _shr(_mix(state, draws), 1)


def _key_code(kind: str, key: Sequence[int | str]) -> int:
    """The int64 code of a purpose key (ints and strings, mixed as :func:`derive_seed` does)."""
    return _cached_code(kind, tuple(part if isinstance(part, str) else int(part) for part in key))


@lru_cache(maxsize=4096)
def _cached_code(kind: str, key: tuple) -> int:
    return _signed(derive_seed(kind, *key))


def _trig_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``2 pi k / 2^16`` in float32, built once on the host and copied to ``device``."""
    if device not in _TABLES:
        host = torch.device("cpu")
        if host not in _TABLES:
            angles = [2 * math.pi * k / 2 ** _TABLE_BITS for k in range(2 ** _TABLE_BITS)]
            _TABLES[host] = tuple(torch.tensor([fn(a) for a in angles], dtype=torch.float64).float()
                                  for fn in (math.cos, math.sin))
        _TABLES[device] = tuple(table.to(device) for table in _TABLES[host])
    return _TABLES[device]


def _box_muller_into(hashes: Tensor, out: Tensor) -> None:
    """``[b, p]`` int64 hashes -> normals written to ``out: [b, 2, p]`` float32 (module docstring)."""
    halves = hashes.view(torch.int32).view(*hashes.shape, 2)  # two's complement 32-bit halves of each hash
    u = halves[..., _HIGH].double().add_(2.0 ** 31 + 0.5).mul_(2.0 ** -32)  # in (0, 1), exact
    radius = u.log_().float().mul_(-2.0).sqrt_()
    low = halves[..., 1 - _HIGH].contiguous()
    index = torch.bitwise_right_shift(low, 16).bitwise_and_((1 << _TABLE_BITS) - 1).view(-1)
    cos_k, sin_k = _trig_tables(hashes.device)
    cos_t, sin_t = cos_k.index_select(0, index).view_as(low), sin_k.index_select(0, index).view_as(low)
    delta = low.bitwise_and_((1 << 16) - 1).float().mul_(_ANGLE_UNIT)  # the angle left over, < 1e-4
    # cos(t + d) ~ cos t - d sin t, sin(t + d) ~ sin t + d cos t: error under d^2 / 2 < 5e-9
    torch.mul(radius, cos_t - sin_t * delta, out=out[:, 0])
    torch.mul(radius, delta.mul_(cos_t).add_(sin_t), out=out[:, 1])


def _blocks(rows: int, pairs: int, device: torch.device) -> list[tuple[slice, slice]]:
    """One block on accelerators; cache-sized blocks of about ``CPU_BLOCK`` pairs on the CPU."""
    if device.type != "cpu" or rows * pairs <= CPU_BLOCK:
        return [(slice(0, rows), slice(0, pairs))]
    step_r, step_c = max(1, CPU_BLOCK // pairs), min(pairs, CPU_BLOCK)
    return [(slice(r, r + step_r), slice(c, c + step_c))
            for r in range(0, rows, step_r) for c in range(0, pairs, step_c)]


def _normal(row_keys: Tensor, like: Tensor) -> Tensor:
    """Standard normals shaped like ``like``; row ``j`` a function of ``row_keys[j]`` and the row size only."""
    if row_keys.shape[0] != like.shape[0]:
        raise InputError(f"{row_keys.shape[0]} noise streams for a batch of {like.shape[0]}: "
                         "give one seed per row of the tensor the noise is shaped like")
    rows, n = like.shape[0], math.prod(like.shape[1:])
    if n == 0:
        return torch.zeros_like(like)
    pairs = (n + 1) // 2
    counters = torch.arange(1, pairs + 1, dtype=torch.int64, device=like.device).mul_(_GAMMA)
    out = torch.empty(rows, 2, pairs, dtype=torch.float32, device=like.device)
    for r, c in _blocks(rows, pairs, like.device):
        hashes = _finalise_(counters[c] + row_keys[r, None])  # SplitMix64 stream of row key k: output p
        _box_muller_into(hashes, out[r, :, c])
    return out.view(rows, 2 * pairs)[:, :n].reshape(like.shape).to(like.dtype)


class SampleNoise:
    """A batch of per-sample noise streams.

    Args:
        seeds: ``[B]`` int64, one seed per sample (see :func:`sample_seeds`); may live on any device,
            and is copied once to each device noise is drawn on.
    """

    def __init__(self, seeds: Tensor):
        self.seeds = torch.as_tensor(seeds).long()
        if self.seeds.dim() != 1:
            raise InputError(f"SampleNoise needs [B] seeds, found shape {tuple(self.seeds.shape)}: "
                             "pass one seed per sample (ssni.rng.sample_seeds)")
        self._copies = {self.seeds.device: self.seeds}

    @classmethod
    def from_ids(cls, run_seed: int, sample_ids: Tensor | Sequence[int],
                 draw: int | Sequence[int] | Tensor = 0) -> SampleNoise:
        return cls(sample_seeds(run_seed, sample_ids, draw))

    def __len__(self) -> int:
        return self.seeds.shape[0]

    def _on(self, device: torch.device) -> Tensor:
        if device not in self._copies:
            self._copies[device] = self.seeds.to(device)
        return self._copies[device]

    def subset(self, idx: Tensor) -> SampleNoise:
        """The streams of samples ``idx`` (positions in this batch), kept on ``idx``'s device."""
        idx = torch.as_tensor(idx)
        return SampleNoise(self._on(idx.device)[idx])

    def randn(self, key: Sequence[int | str], like: Tensor, idx: Tensor | None = None) -> Tensor:
        """Standard normal noise shaped like ``like`` for samples ``idx`` (default: all).

        Row ``j`` is drawn from ``(seeds[idx[j]], *key)`` alone, on ``like``'s device, in ``like``'s dtype.
        """
        seeds = self._on(like.device)
        seeds = seeds if idx is None else seeds[torch.as_tensor(idx).to(like.device)]
        return _normal(_mix(seeds, _key_code("randn", key)), like)

    def randn_levels(self, key: Sequence[int | str], levels: Tensor, like: Tensor) -> Tensor:
        """Like :meth:`randn`, with row ``j`` keyed by ``(*key, levels[j])`` too (``levels``: ``[B]`` integers)."""
        levels = torch.as_tensor(levels)
        if levels.shape != (len(self),):
            raise InputError(f"randn_levels needs [B] = [{len(self)}] levels, found shape {tuple(levels.shape)}: "
                             "pass one integer level per sample")
        # row key SplitMix64(seed ^ key code ^ level): levels only flip low bits, which the mix spreads
        row = torch.bitwise_xor(self._on(like.device), levels.to(like.device, torch.int64))
        return _normal(_mix(row, _key_code("randn_levels", key)), like)
