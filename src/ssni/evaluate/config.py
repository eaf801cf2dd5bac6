"""Experiment configuration: frozen dataclasses, TOML presets, overrides and a stable hash.

A config file has the tables ``[data]``, ``[models]``, ``[purifier]``, ``[ssni]``,
``[evaluate]`` and an array ``[[attacks]]``. Unknown keys are errors that list
the valid ones. ``[purifier]`` holds the keys every purifier shares; each method's own
settings (its registry entry's dataclass) go in the sub-table ``[purifier.<method>]``, or flat
in ``[purifier]`` (older configs): both land in one settings object, and a key of another
method, or a sub-table of another method, is an error. An ``[[attacks]]`` key the named
attack does not read is an error too (:data:`ssni.evaluate.registries.ATTACKS`). The hash
of the resolved config is stored with every result, and a run only resumes from a store with
the same hash.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runtime import PRECISIONS
from .config_checks import check_attack, check_cross, check_section, misplaced_purifier_key
from .registries import ATTACKS, PURIFIERS, REWEIGHTS, Names


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist-5k"
    split: str = "test"
    n: int = 200
    root: str | None = None  # cifar10: the cifar-10-batches-py folder; imagenet: folder with val/<class>/
    subset: str = "first"  # first: the split's first n images; paper: the reference code's seeded random draw
    subset_seed: int = 0  # paper: numpy RandomState seed of the draw (the reference code uses 0)


@dataclass(frozen=True)
class ModelsConfig:
    diffusion: str = "mnist-unet"
    classifier: str = "mnist-cnn"
    random_init: bool = False  # public architectures with random weights (dry runs only)
    allow_pickle: bool = False  # explicit opt-in to unpickle code in checkpoint files


@dataclass(frozen=True)
class PurifierConfig:
    """The ``[purifier]`` keys every purifier shares, plus ``settings``: the method's own frozen
    dataclass (``PURIFIERS[method].settings``, its ``[purifier.<method>]`` table; ``None`` gives
    its defaults; ``method = "none"`` has none)."""

    method: str = "diffpure"  # none | a PURIFIERS name (diffpure | gdmp | gns)
    steps: int = 10  # reverse grid length n per round; 0 = unit steps (full DDPM)
    eta: float = 1.0
    clip_x0: bool | None = None  # None: the method's reference default (DiffPure, GNS: off; GDMP: on)
    solver: str = "ddpm"  # ddpm | sde (reverse VP-SDE, Euler-Maruyama: DiffPure's own; not for gdmp)
    votes: int = 1
    checkpoint: bool | str = True  # activation checkpointing under attack; "auto": off when memory allows
    resolution: int | None = None  # the diffusion model's size (ImageNet: 224 -> 256 -> 224)
    settings: Any = None

    def __post_init__(self):
        entry = PURIFIERS.get(self.method)
        if entry is not None and self.settings is None:
            object.__setattr__(self, "settings", entry.settings())
        elif not (isinstance(self.settings, entry.settings) if entry else self.settings is None):
            raise ConfigError(f"purifier settings {self.settings!r} do not belong to method {self.method!r}; "
                              f"expected {entry.settings.__name__ if entry else 'none'}")


@dataclass(frozen=True)
class SSNIConfig:
    reweight: str = "none"  # none | sigmoid | linear
    n_levels: int = 10
    bias: int = 5
    tau: float | None = None
    reference_compat: bool = False
    calibration_size: int = 1000
    calibration_seed: int = 0  # fixed, shared by every evaluate.seed (the authors use one reference file)
    calibration_split: str = "train"  # train | val (held-out clean images the diffusion model never saw)
    calibration_file: str | None = None  # JSON written by Calibration.save: used when its meta matches, else written
    differentiable: bool = True


@dataclass(frozen=True)
class AttackConfig:
    name: str = "pgd"  # pgd | bpda | adaptive | autoattack | apgd | transfer
    norm: str = "linf"
    eps: float = 0.3
    steps: int = 20
    step_size: float = 0.05
    eot: int = 2
    eot_batch: int | str = 1  # EOT draws stacked in one forward/backward pass (faster, eot_batch x the memory); "auto"
    random_start: bool = False
    sign_step: bool = False  # l_2 with sign steps, as the paper's code does
    score_target: str = "mu+tau"  # adaptive: keep e(x) <= mu | mu+tau | clean | a number such as "1234.5"
    version: str = "rand"  # autoattack: rand (APGD-CE + APGD-DLR) | apgd-ce | apgd-dlr
    gradient: str = "exact"  # exact | surrogate (the paper's attack: shorter reverse chain) | bpda
    surrogate_steps: int = 20  # surrogate: reverse steps per round of the chain the attack differentiates
    # apgd: DLR by default (invariant to shifting and rescaling the logits, so saturated or rescaled
    # logits cannot hide the gradient; AutoAttack's decisive loss); restarts keyed by (seed, restart);
    # targeted runs once per likely other class; iterate best = highest-loss point (AutoAttack's best_loss)
    loss: str = "dlr"  # apgd: ce | margin | dlr
    restarts: int = 1
    targeted: bool = False
    iterate: str = "best"  # apgd: best | last


@dataclass(frozen=True)
class EvaluateConfig:
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N (ssni.runtime)
    # fp32: real fp32 (TF32 off) | tf32 | bf16 (autocast of the networks): opt-in speed modes whose
    # measured effect on the verdicts is in the README; part of the config hash
    precision: str = "fp32"
    # torch.compile both networks (static shapes, rows padded to a few bucket widths); pays off on long GPU runs
    compile: bool = False
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    channels_last: bool = False  # networks and images in channels_last layout (measure: slower for DDPM++ on an H100)
    seed: int = 0
    batch_size: int | str = 50  # or "auto": the fastest batch that fits, measured on the device (--plan)
    # Most rows per network call of the score-norm pass, which otherwise runs all n_levels x batch rows
    # in one call, holding that many rows' activations (ImageNet's 256x256 UNet: 0.56 GiB per row at
    # inference); None: no cap. Results agree within float rounding (speed and memory, as batch_size).
    max_rows: int | None = None
    # Every protocol (single | majority | worst | any_iterate) is computed from the same
    # rescore_draws fresh draws and reported side by side; rescore names the headline one.
    rescore: str = "worst"
    rescore_draws: int = 8


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    purifier: PurifierConfig = field(default_factory=PurifierConfig)
    ssni: SSNIConfig = field(default_factory=SSNIConfig)
    attacks: tuple[AttackConfig, ...] = (AttackConfig(),)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict:
        """The config as :func:`from_dict` reads it: the purifier's settings under its method's
        name, each attack with the keys it reads only."""
        data = asdict(self)
        settings = data["purifier"].pop("settings")
        if settings is not None:
            data["purifier"][self.purifier.method] = settings
        data["attacks"] = [{k: v for k, v in a.items() if k in ATTACKS[a["name"]].reads} for a in data["attacks"]]
        return data

    def hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (first 16 hex digits).

        Settings that change how fast a run goes but not its per-sample results (device, batch
        size, compile, layout, activation checkpointing, stacked EOT draws; tested to agree) are
        left out, so a run can resume with other values of them.
        """
        data = self.to_dict()
        for section in ("evaluate", "purifier"):
            for key in SPEED_ONLY[section]:
                data[section].pop(key)
        for attack in data["attacks"]:
            for key in SPEED_ONLY["attacks"]:
                attack.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


SPEED_ONLY = {"evaluate": ("device", "batch_size", "compile", "compile_mode", "max_rows", "channels_last"),
              "purifier": ("checkpoint",), "attacks": ("eot_batch",)}

CHOICES = {("purifier", "method"): Names(PURIFIERS, "none"),
           ("purifier", "solver"): ("ddpm", "sde"),
           ("ssni", "reweight"): Names(REWEIGHTS, "none"),
           ("attacks", "name"): Names(ATTACKS),
           ("attacks", "loss"): ("ce", "margin", "dlr"),
           ("attacks", "iterate"): ("best", "last"),
           ("attacks", "norm"): ("linf", "l2"),
           ("attacks", "version"): ("rand", "apgd-ce", "apgd-dlr"),
           ("attacks", "gradient"): ("exact", "surrogate", "bpda"),
           ("ssni", "calibration_split"): ("train", "val"),
           ("data", "subset"): ("first", "paper"),
           ("evaluate", "rescore"): ("single", "majority", "worst", "any_iterate"),
           ("evaluate", "precision"): PRECISIONS,
           ("evaluate", "compile_mode"): ("default", "reduce-overhead", "max-autotune")}
SECTIONS = {"data": DataConfig, "models": ModelsConfig, "purifier": PurifierConfig, "ssni": SSNIConfig,
            "evaluate": EvaluateConfig}  # [purifier] is read by _purifier (shared keys + its method's table)


def _build(cls, section: str, values: dict[str, Any], **given):
    """``cls(**values, **given)`` after the key, type, range and choice checks of ``values``."""
    valid = {f.name for f in fields(cls)} - set(given)
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{section}]; valid keys: {sorted(valid)}")
    check_section(cls, section, values)  # types first: a list cannot be looked up among the choices
    for (sec, key), options in CHOICES.items():
        if sec == section and key in values and values[key] not in options:
            raise ConfigError(f"[{section}] {key} = {values[key]!r}; choose one of {list(options)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values, **given)


def _purifier(values: dict[str, Any]) -> PurifierConfig:
    """``[purifier]``: its shared keys, then the method's settings from ``[purifier.<method>]``
    and from flat keys of that method (one settings object; a key given both ways is an error)."""
    shared = {k: v for k, v in values.items() if k in _SHARED_PURIFIER_KEYS}
    method = _build(PurifierConfig, "purifier", shared, settings=None).method  # checks method first
    own = _method_values(method, {k: v for k, v in values.items() if k not in shared})
    entry = PURIFIERS.get(method)
    settings = _build(entry.settings, f"purifier.{method}", own) if entry else None
    return _build(PurifierConfig, "purifier", shared, settings=settings)


_SHARED_PURIFIER_KEYS = frozenset(f.name for f in fields(PurifierConfig)) - {"settings"}


def _method_values(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """The method's own keys among ``[purifier]``'s other keys: its sub-table merged with its flat keys."""
    table = values.pop(method) if method in PURIFIERS and isinstance(values.get(method), dict) else {}
    for key, value in values.items():
        if key in PURIFIERS and isinstance(value, dict):
            raise ConfigError(f"[purifier.{key}] is given but method = {method!r}: it holds {key}'s settings; "
                              f"set method = {key!r} or remove the table")
    for where, keys in ((f"[purifier.{method}]", table), ("[purifier]", values)):
        for key in keys:
            err = misplaced_purifier_key(key, method, where)
            if err is not None:
                raise err
    own = {f.name for f in fields(PURIFIERS[method].settings)} if method in PURIFIERS else set()
    unknown = sorted(set(values) - own)
    if unknown:
        table_text = f", or a [purifier.{method}] table of {sorted(own)}" if own else ""
        raise ConfigError(f"unknown key(s) {unknown} in [purifier]; valid keys: "
                          f"{sorted(_SHARED_PURIFIER_KEYS | own)}{table_text}")
    twice = sorted(set(values) & set(table))
    if twice:
        raise ConfigError(f"{twice} given both in [purifier] and in [purifier.{method}]; give each once")
    return {**table, **values}


def purifier_config(method: str, **values: Any) -> PurifierConfig:
    """A checked :class:`PurifierConfig` from flat keyword values, e.g.
    ``purifier_config("gdmp", t_star=75, rounds=2, steps=5)`` (shared and method keys mixed)."""
    return _purifier({"method": method, **values})


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    unknown = sorted(set(data) - set(SECTIONS) - {"attacks"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid: {sorted([*SECTIONS, 'attacks'])}")
    _check_shape(data)
    parts = {name: _build(cls, name, data.get(name, {})) for name, cls in SECTIONS.items() if name != "purifier"}
    check_cross(data.get("attacks", [{}]))
    attacks = tuple(_attack(k, a) for k, a in enumerate(data.get("attacks", [{}])))
    if not attacks:
        raise ConfigError("[[attacks]] is empty; give at least one attack")
    return ExperimentConfig(purifier=_purifier(data.get("purifier", {})), attacks=attacks, **parts)


def _check_shape(data: dict[str, Any]) -> None:
    """Each section is a table and ``attacks`` an array of tables (``[attacks]`` and ``[[attacks]]``
    are easy to mix up in TOML, and ``data = 5`` is a value, not a table)."""
    for name in SECTIONS:
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{name} = {data[name]!r} at the top level: {name} is a table, written as a "
                              f"[{name}] line with its keys below it")
    attacks = data.get("attacks", [])
    if isinstance(attacks, dict):
        raise ConfigError("[attacks] is written as one table (one bracket); each attack is an entry of the "
                          "array [[attacks]] (two brackets)")
    if not isinstance(attacks, list) or not all(isinstance(a, dict) for a in attacks):
        raise ConfigError(f"attacks = {attacks!r}: give each attack as an [[attacks]] line with its keys below it")


def _attack(k: int, values: dict[str, Any]) -> AttackConfig:
    attack = _build(AttackConfig, "attacks", values)
    check_attack(k, values)
    return attack


def load_config(path: Path, overrides: dict[str, Any] | None = None,
                notes: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML preset and apply ``{"section.key": value}`` overrides (``purifier.gdmp.rounds``
    reaches a sub-table, ``attacks.K.key`` the K-th ``[[attacks]]`` entry). A flat method key
    (``purifier.t_star``) replaces the value of the ``[purifier.<method>]`` table that holds it.

    The file is checked as written first, so an override (``--limit``, ``--set``) does not hide a bad
    value in it; an empty file is refused. ``notes`` receives what the file leaves to the defaults
    that a user may not expect (no ``[[attacks]]``: the default attack)."""
    data = _read_toml(path)
    try:
        cfg = from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if notes is not None and not data.get("attacks"):
        a = cfg.attacks[0]
        notes.append(f"{path} has no [[attacks]]: using the default attack ({a.name}, {a.norm} eps {a.eps}, "
                     f"{a.steps} steps, EOT {a.eot})")
    if not overrides:
        return cfg
    for dotted, value in overrides.items():
        _override(data, dotted, value)
    return from_dict(data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    if not data:
        raise ConfigError(f"{path} is empty; start from a preset in configs/ (e.g. "
                          "configs/mnist-diffpure-ssni-n.toml) and change what you need")
    return data


def _override(data: dict[str, Any], dotted: str, value: Any) -> None:
    section, *path = dotted.split(".")
    if not path or not all(path):
        raise ConfigError(f"override {dotted!r}: use section.key=value (e.g. purifier.steps=5)")
    if section == "attacks":  # attacks.K.key addresses the K-th [[attacks]] entry
        attacks = data.setdefault("attacks", [{}])
        if len(path) != 2 or not path[0].isdigit() or int(path[0]) >= len(attacks):
            raise ConfigError(f"override {dotted!r}: use attacks.K.key with K < {len(attacks)}")
        attacks[int(path[0])][path[1]] = value
        return
    table = data.setdefault(section, {})
    if section == "purifier" and len(path) == 1:  # a flat key replaces it where the file gives it
        table = next((t for t in table.values() if isinstance(t, dict) and path[0] in t), table)
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {dotted!r}: {part} is a value, not a table")
    table[path[-1]] = value


def dry_run(cfg: ExperimentConfig, n: int = 2) -> ExperimentConfig:
    """The same pipeline at plumbing size: random-init public architectures, ``n`` samples,
    one attack step without EOT, at most 2 reverse steps and 2 score-norm levels. Not a measurement."""
    p, s = cfg.purifier, cfg.ssni
    return replace(
        cfg, data=replace(cfg.data, n=n), models=replace(cfg.models, random_init=True),
        purifier=replace(p, steps=2, votes=1, checkpoint=p.checkpoint is not False),  # "auto": nothing measured
        ssni=replace(s, n_levels=min(s.n_levels, 2), calibration_size=2),
        attacks=tuple(replace(a, steps=1, eot=1, eot_batch=1) for a in cfg.attacks),
        evaluate=replace(cfg.evaluate, batch_size=n, rescore_draws=1))
