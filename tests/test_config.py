"""config.py: loading, overrides, and errors that name the key before any work starts."""
import pytest
import torch

import config
import train

ROOT_CONFIG = "config.yaml"


def test_shipped_config_is_the_b16_recipe_and_overrides_apply():
    cfg = config.load_config(ROOT_CONFIG)
    assert (cfg.model.name, cfg.training.global_batch_size, cfg.training.epochs, cfg.optim.lr) == ("pMF-B/16", 1024, 320, 1e-3)
    assert cfg.training.ema_half_lives_kimg == [500.0, 1000.0, 2000.0]
    method = config.method_config(cfg)
    assert (method.noise_scale, method.P_mean, method.t_thr, method.cfg_max) == (1.0, 0.8, 0.8, 7.0)
    cfg = config.load_config(ROOT_CONFIG, ["training.global_batch_size=256", "model.name=pMF-H/16", "method.t_thr=0.5"])
    method = config.method_config(cfg)
    assert cfg.training.global_batch_size == 256 and method.noise_scale == 2.0 and method.tr_uniform == 0.1
    assert method.t_thr == 0.5


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(config.ConfigError, match="unknown key 'training.global_batchsize'.*'training.global_batch_size'"):
        config.load_config(ROOT_CONFIG, ["training.global_batchsize=256"])
    with pytest.raises(config.ConfigError, match="unknown key 'modle'.*'model'"):
        config.load_config(ROOT_CONFIG, ["modle.name=pMF-B/16"])


def test_wrong_types_and_impossible_values():
    with pytest.raises(config.ConfigError, match="training.micro_batch_size must be an integer, got '32a'"):
        config.load_config(ROOT_CONFIG, ["training.micro_batch_size=32a"])
    with pytest.raises(config.ConfigError, match="optim.lr must be positive"):
        config.load_config(ROOT_CONFIG, ["optim.lr=-1"])
    with pytest.raises(config.ConfigError, match="training.mixed_precision must be one of"):
        config.load_config(ROOT_CONFIG, ["training.mixed_precision=fp8"])
    with pytest.raises(config.ConfigError, match="model/method: hidden_size 100"):
        config.load_config(ROOT_CONFIG, ["model.hidden_size=100"])
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_config("missing.yaml")


def test_inconsistent_batch_sizes():
    with pytest.raises(config.ConfigError, match="not a multiple of training.micro_batch_size 48"):
        config.load_config(ROOT_CONFIG, ["training.micro_batch_size=48"])
    cfg = config.load_config(ROOT_CONFIG, ["training.micro_batch_size=32"])
    assert train.resolve_batch_split(cfg, 8)[:2] == (32, 4)
    with pytest.raises(config.ConfigError, match=r"1024 cannot be split over 3 processes"):
        train.resolve_batch_split(cfg, 3)
    cfg = config.load_config(ROOT_CONFIG, ["training.grad_accum_steps=2"])
    with pytest.raises(config.ConfigError, match="grad_accum_steps 2"):
        train.resolve_batch_split(cfg, 8)


def test_config_round_trips_as_plain_data(tmp_path):
    cfg = config.load_config(ROOT_CONFIG, ["training.seed=7"])
    torch.save({"config": config.to_dict(cfg)}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert config.from_dict(loaded) == cfg
