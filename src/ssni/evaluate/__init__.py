"""Resumable, shardable robustness evaluation: config -> per-sample SQLite rows -> report."""

from .config import ExperimentConfig, load_config
from .runner import evaluate
from .store import Store

__all__ = ["ExperimentConfig", "Store", "evaluate", "load_config"]
