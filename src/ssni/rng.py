"""Per-sample randomness: every draw is a function of (sample seed, purpose key).

No global RNG is touched. Sample ``i`` gets a seed derived from
``(run seed, sample id, draw)``; each random tensor it needs is then generated
from ``(that seed, key)``, where the key names the purpose (forward noise of
round ``r``, reverse noise at level ``a``, score-norm level ``k``...). So a
sample's result does not depend on batch size, order, partners, sharding, on
which reverse steps a scheduler skips, or on whether a run was resumed.
"""

from __future__ import annotations

import zlib
from numbers import Integral
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK = (1 << 64) - 1


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


def sample_seeds(run_seed: int, sample_ids: Tensor | Sequence[int], draw: int | Sequence[int] = 0) -> Tensor:
    """One seed per sample, ``[B]`` int64, from ``(run seed, sample id, draw)``; ``draw`` may be per sample."""
    ids = sample_ids.tolist() if isinstance(sample_ids, Tensor) else list(sample_ids)
    draws = [int(draw)] * len(ids) if isinstance(draw, Integral) else [int(d) for d in draw]
    if len(draws) != len(ids):
        raise ValueError(f"{len(draws)} draws for {len(ids)} samples")
    return torch.tensor([derive_seed(run_seed, i, d) for i, d in zip(ids, draws)], dtype=torch.int64)


class SampleNoise:
    """A batch of per-sample noise streams.

    Args:
        seeds: ``[B]`` int64, one seed per sample (see :func:`sample_seeds`).
    """

    def __init__(self, seeds: Tensor):
        self.seeds = seeds.long().cpu()

    @classmethod
    def from_ids(cls, run_seed: int, sample_ids: Tensor | Sequence[int],
                 draw: int | Sequence[int] = 0) -> SampleNoise:
        return cls(sample_seeds(run_seed, sample_ids, draw))

    def __len__(self) -> int:
        return self.seeds.shape[0]

    def subset(self, idx: Tensor) -> SampleNoise:
        """The streams of samples ``idx`` (positions in this batch)."""
        return SampleNoise(self.seeds[idx.cpu()])

    def randn(self, key: Sequence[int | str], like: Tensor, idx: Tensor | None = None) -> Tensor:
        """Standard normal noise shaped like ``like`` for samples ``idx`` (default: all).

        Row ``j`` is drawn from ``(seeds[idx[j]], *key)`` alone.
        """
        seeds = self.seeds if idx is None else self.seeds[idx.cpu()]
        return _rows(seeds.tolist(), [tuple(key)] * len(seeds), like)

    def randn_levels(self, key: Sequence[int | str], levels: Tensor, like: Tensor) -> Tensor:
        """Like :meth:`randn`, with row ``j`` keyed by ``(*key, levels[j])`` too."""
        keys = [(*key, int(level)) for level in levels.tolist()]
        return _rows(self.seeds.tolist(), keys, like)


def _rows(seeds: list[int], keys: list[tuple], like: Tensor) -> Tensor:
    if len(seeds) != like.shape[0]:
        raise ValueError(f"{len(seeds)} noise streams for a batch of {like.shape[0]}")
    if not seeds:
        return torch.zeros_like(like)
    gen = torch.Generator()
    rows = []
    for seed, key in zip(seeds, keys):
        gen.manual_seed(derive_seed(seed, *key))
        rows.append(torch.randn(like.shape[1:], generator=gen))
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)
