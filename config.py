"""Typed, validated run configuration: YAML file + dotted command-line overrides.

    cfg = load_config("config.yaml", ["training.global_batch_size=256", "model.name=pMF-L/16"])

Every section is a dataclass; unknown keys, wrong types and impossible values raise ConfigError
naming the key (and the closest valid key for typos) before any work starts. `to_dict(cfg)` is
plain data (str, int, float, bool, None, lists, dicts), safe for `torch.load(weights_only=True)`.
"""
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import yaml

import model as model_lib
import pmf


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


@dataclass
class ModelConfig:
    name: str = "pMF-B/16"
    input_size: Optional[int] = None
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    head_depth: Optional[int] = None
    recompute_v_head: bool = True


# The method section has one optional key per PMFConfig field: None means the preset's recipe or
# the paper's constant (pmf.RECIPES / pmf.PMFConfig are the single source of those values).
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig", [(f.name, Optional[f.type], None) for f in fields(pmf.PMFConfig) if f.name != "num_classes"])


@dataclass
class PerceptualConfig:
    lpips: bool = True
    convnext: bool = True
    vgg16_path: Optional[str] = None
    convnext_path: Optional[str] = None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    momentum: float = 0.95
    adam_betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    adam_weight_decay: float = 0.0
    partition: str = "official"
    adjust_lr: str = "original"
    ns_dtype: str = "float32"


@dataclass
class DataConfig:
    source: str = "parquet"
    path: str = "data"
    split: str = "train"
    num_workers: int = 8
    dummy_size: int = 1281167


@dataclass
class TrainingConfig:
    global_batch_size: int = 1024
    micro_batch_size: int = 32
    grad_accum_steps: Optional[int] = None
    epochs: int = 320
    max_steps: Optional[int] = None
    seed: int = 0
    mixed_precision: str = "no"
    ema_half_lives_kimg: list = field(default_factory=lambda: [500.0, 1000.0, 2000.0])
    ema_rampup: float = 0.05
    max_consecutive_nonfinite: int = 50
    init_from: str = ""
    init_ema: bool = False
    init_v_head: str = "u_head"


@dataclass
class SamplingConfig:
    omega: float = 7.5
    t_min: float = 0.1
    t_max: float = 0.8
    steps: int = 1
    ema: int = -1


@dataclass
class LoggingConfig:
    out_dir: str = "runs/pmf-b16"
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_every: int = 5000
    sample_grid: int = 64
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = ""


CHOICES = {
    "model.name": sorted(model_lib.PRESETS),
    "method.class_dropout_mode": list(pmf.DROPOUT_MODES),
    "method.prediction": list(pmf.PREDICTIONS),
    "method.jvp": list(pmf.JVP_PATHS),
    "optim.partition": ["official", "keller"],
    "optim.adjust_lr": ["original", "match_rms_adamw"],
    "optim.ns_dtype": ["float32", "bfloat16"],
    "data.source": ["parquet", "imagefolder", "mnist", "dummy"],
    "training.mixed_precision": ["no", "fp16", "bf16"],
    "training.init_v_head": ["u_head", "random"],
}
POSITIVE = ["training.global_batch_size", "training.micro_batch_size", "training.grad_accum_steps",
            "training.epochs", "training.max_steps", "optim.lr", "logging.log_every", "logging.ckpt_every",
            "logging.keep_last", "logging.sample_every", "sampling.steps", "data.dummy_size",
            "training.max_consecutive_nonfinite", "sampling.omega"]


def _keys(cls, prefix=""):
    return [f"{prefix}{f.name}" for f in fields(cls)]


def _closest(key, candidates):
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(candidates)}"


def _coerce(value, annotation, key):
    """Check `value` against a field annotation; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[T]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if annotation is list:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    raise ConfigError(f"{key}: unsupported annotation {annotation}")


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    names = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'" + _closest(f"{prefix}{key}", _keys(cls, prefix)))
    values = {}
    for name, f in names.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            values[name] = _build(type(f.default_factory()), data[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(data[name], f.type, f"{prefix}{name}")
    return cls(**values)


def _set_dotted(tree, dotted, value):
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _check_values(cfg):
    flat = to_dict(cfg)
    get = lambda dotted: _lookup(flat, dotted)
    for key, options in CHOICES.items():
        if get(key) is not None and get(key) not in options:
            raise ConfigError(f"{key} must be one of {options}, got {get(key)!r}")
    for key in POSITIVE:
        if get(key) is not None and get(key) <= 0:
            raise ConfigError(f"{key} must be positive, got {get(key)}")
    if cfg.training.global_batch_size % cfg.training.micro_batch_size:
        raise ConfigError(f"training.global_batch_size {cfg.training.global_batch_size} is not a multiple of "
                          f"training.micro_batch_size {cfg.training.micro_batch_size}")
    if not cfg.training.ema_half_lives_kimg or min(cfg.training.ema_half_lives_kimg) <= 0:
        raise ConfigError("training.ema_half_lives_kimg must be a non-empty list of positive numbers")
    if not 0 <= cfg.sampling.t_min <= cfg.sampling.t_max <= 1:
        raise ConfigError("sampling.t_min and sampling.t_max must satisfy 0 <= t_min <= t_max <= 1")
    if not -len(cfg.training.ema_half_lives_kimg) <= cfg.sampling.ema < len(cfg.training.ema_half_lives_kimg):
        raise ConfigError(f"sampling.ema {cfg.sampling.ema} does not index training.ema_half_lives_kimg")
    try:
        method_config(cfg)
        with torch.device("meta"):  # validates the shape overrides without allocating
            model_lib.build_model(cfg.model.name, **model_overrides(cfg))
    except ValueError as err:
        raise ConfigError(f"model/method: {err}") from err


def _lookup(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def model_overrides(cfg):
    """The non-null model.* keys (shape overrides, recompute_v_head) for `model.build_model`."""
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "name" and v is not None}


def method_config(cfg):
    """The resolved pmf.PMFConfig: preset recipe, then the non-null method.* values."""
    overrides = {k: v for k, v in dataclasses.asdict(cfg.method).items() if v is not None}
    if cfg.model.num_classes is not None:
        overrides["num_classes"] = cfg.model.num_classes
    return pmf.PMFConfig.for_preset(cfg.model.name, **overrides)


def parse_overrides(items):
    """['a.b=1', ...] -> [(dotted key, YAML-typed value)]."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def load_config(path=None, overrides=()):
    """Load YAML (or defaults when path is None), apply dotted overrides, validate."""
    data = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; pass --config PATH") from None
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    _check_values(cfg)
    return cfg


def from_dict(data):
    """Rebuild a Config from `to_dict` output (e.g. the copy saved in a checkpoint)."""
    cfg = _build(Config, data, "")
    _check_values(cfg)
    return cfg


def to_dict(cfg):
    return dataclasses.asdict(cfg)
