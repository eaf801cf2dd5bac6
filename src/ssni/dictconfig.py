"""One JSON round trip for the frozen dataclass configs of networks (saved beside their weights)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


class DictConfig:
    """Mixin for frozen dataclasses: ``to_dict`` and its inverse ``from_dict``.

    JSON has no tuples, so ``from_dict`` turns lists back into tuples (every sequence field of a
    network config is a tuple, which keeps configs hashable and comparable).
    """

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
