"""Typed, validated run configuration: YAML file + dotted command-line overrides.

    cfg = load_config("config.yaml", ["training.global_batch_size=256", "model.name=pMF-L/16"])

Every section is a dataclass; unknown keys, wrong types, impossible values, YAML syntax errors and
an unusable logging.out_dir raise ConfigError naming the key or file (and the closest valid key for
typos) before any work starts. Files and overrides are read with YAML 1.2 core-schema numbers and
booleans: `1e-4` is a float (YAML 1.1, PyYAML's default, reads it as a string) and `no` is a
string (boolean keys still take yes/no/on/off). `to_dict(cfg)` is plain data (str, int, float,
bool, None, lists, dicts), safe for `torch.load(weights_only=True)`.
"""
import dataclasses
import difflib
import math
import os
import re
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
    prefix_tokens: Optional[list] = None  # null: the paper's [8, 4, 2, 2, 4]
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
    decay_fraction: float = 0.0


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
    compile: Optional[bool] = None  # null = auto: pmf.compile_wanted
    parallel: str = "ddp"  # ddp (Accelerate) | fsdp | hsdp (FSDP2, parallel.py)
    hsdp_shard_size: Optional[int] = None  # hsdp: processes per shard group (null: per node)
    init_from: str = ""
    init_ema: bool = False
    init_optimizer: bool = False
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
    "training.parallel": ["ddp", "fsdp", "hsdp"],
    "training.init_v_head": ["u_head", "random"],
}
POSITIVE = ["training.global_batch_size", "training.micro_batch_size", "training.grad_accum_steps",
            "training.epochs", "training.max_steps", "optim.lr", "optim.eps", "logging.log_every",
            "logging.ckpt_every", "logging.keep_last", "logging.sample_every", "logging.sample_grid",
            "sampling.steps", "data.dummy_size", "training.max_consecutive_nonfinite", "training.ema_rampup",
            "training.hsdp_shard_size",
            "sampling.omega", "model.input_size", "model.in_channels", "model.num_classes", "model.depth",
            "model.hidden_size", "model.num_heads", "model.patch_size", "model.head_depth"]
NON_NEGATIVE = ["data.num_workers", "optim.weight_decay", "optim.adam_weight_decay"]


def _keys(cls, prefix=""):
    return [f"{prefix}{f.name}" for f in fields(cls)]


def _closest(key, candidates):
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(candidates)}"


_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}  # still accepted where a boolean is expected


def _coerce(value, annotation, key):
    """Check `value` against a field annotation; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[T]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if annotation is bool:
        value = _YAML11_BOOLS.get(value.lower(), value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():  # 1e5 written for 100000
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if annotation is list:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in value):
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
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(key)}")
    betas = cfg.optim.adam_betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.adam_betas must be two numbers [b1, b2] in [0, 1), got {betas}")
    if not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    if not 0 <= cfg.optim.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in [0, 1] (0 = constant lr), got {cfg.optim.decay_fraction}")
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
    _check_sharded(cfg)
    if cfg.training.compile and method_config(cfg).jvp == "simple":
        raise ConfigError("training.compile=true needs method.jvp=fast: method.jvp=simple takes torch.func.jvp, and "
                          "compiled forward-mode AD drops tangents (pytorch #187284, #192985); "
                          "set training.compile=false (or null) or method.jvp=fast")


def _check_sharded(cfg):
    """training.parallel fsdp/hsdp: the combinations that are refused, with the reason."""
    t = cfg.training
    if t.parallel == "ddp":
        return
    if method_config(cfg).jvp == "simple":
        raise ConfigError(f"training.parallel={t.parallel} needs method.jvp=fast: method.jvp=simple takes "
                          "torch.func.jvp on the whole network, whose parameters are shards outside each block's "
                          "forward; set method.jvp=fast (the single-pass tangent) or training.parallel=ddp")
    if t.mixed_precision == "fp16":
        raise ConfigError(f"training.parallel={t.parallel} does not support training.mixed_precision=fp16: the loss "
                          "scaler's inf check would see each process's gradient shard only, so the processes could "
                          "disagree on skipping a step; use bf16 or no, or training.parallel=ddp")
    if t.compile:
        raise ConfigError(f"training.compile=true is not supported with training.parallel={t.parallel} (untested); "
                          "set training.compile=false or null")


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


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's floats (`1e-4`, `1E5`, `.5`) and
    booleans (only true/false: `no` stays a string for training.mixed_precision; boolean keys still
    take yes/no/on/off); ints, null and strings are resolved as before."""


_FLOAT, _BOOL = "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_FLOAT, _BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(  # tried after the int resolver, so 32 stays an int
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))


def _yaml_load(text, source):
    """Parse YAML text; a syntax error becomes one ConfigError line naming `source` and the position."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}{where}: invalid YAML ({problem}); quote strings that contain "
                          "':' or '#', close brackets and keep the indentation consistent") from None


def parse_overrides(items):
    """['a.b=1', ...] -> [(dotted key, YAML-typed value)]."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), _yaml_load(raw, f"override {item!r}") if raw.strip() else None))
    return parsed


def _read_config_file(path):
    """The YAML mapping in `path`; a missing, unreadable or malformed file raises ConfigError."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass --config PATH") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"config file {path} cannot be read ({reason}); pass --config PATH of a YAML file") from None
    data = _yaml_load(text, f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model:, training:, ...), "
                          f"got a {type(data).__name__}")
    return data


def _check_out_dir(out_dir):
    """logging.out_dir must be a directory or creatable: no file may sit at it or above it."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"logging.out_dir {out_dir!r}: {path!r} is a file, not a directory; "
                          "set logging.out_dir to a directory path")


def load_config(path=None, overrides=()):
    """Load YAML (or defaults when path is None), apply dotted overrides, validate."""
    data = {} if path is None else _read_config_file(path)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    _check_values(cfg)
    _check_out_dir(cfg.logging.out_dir)
    return cfg


def from_dict(data):
    """Rebuild a Config from `to_dict` output (e.g. the copy saved in a checkpoint)."""
    cfg = _build(Config, data, "")
    _check_values(cfg)
    return cfg


def to_dict(cfg):
    return dataclasses.asdict(cfg)
