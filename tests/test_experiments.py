"""The experiments' plumbing: KEY=VALUE overrides given to a script reach every train.py command it
runs, after the script's own keys (the last one wins in config.py), so a README table measured with
another quickstart.yaml recipe reruns as written. Nothing is trained here."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import finetune_digits  # noqa: E402
import prediction_ablation  # noqa: E402


class Stop(Exception):
    pass


def _first_command(monkeypatch, module, call):
    """The command line of the first `run` that `call` makes; the run itself is not started."""
    commands = []

    def record(cmd, log_path):
        commands.append(cmd)
        raise Stop

    monkeypatch.setattr(module, "run", record)
    with pytest.raises(Stop):
        call()
    return commands[0]


@pytest.mark.parametrize("setting", ["28px-x", "56px-u"])
def test_ablation_overrides_reach_train(monkeypatch, tmp_path, setting):
    args = prediction_ablation.parse_args(["--out", str(tmp_path), "method.data_proportion=0.5", "optim.lr=0.003"])
    folders = {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}
    cmd = _first_command(monkeypatch, prediction_ablation,
                         lambda: prediction_ablation.train_and_score(setting, args, folders, None, None))
    assert cmd[1:4] == ["train.py", "--config", "quickstart.yaml"]
    assert cmd[-2:] == ["method.data_proportion=0.5", "optim.lr=0.003"]
    assert f"method.prediction={setting[-1]}" in cmd


def test_finetune_overrides_reach_train(monkeypatch, tmp_path):
    args = finetune_digits.parse_args(["--source", "src.pt", "--out", str(tmp_path), "method.data_proportion=0.5"])
    cmd = _first_command(monkeypatch, finetune_digits,
                         lambda: finetune_digits.train_and_score("init", args, {"train": "t", "held": "h"}, None, 2))
    assert cmd[1:4] == ["train.py", "--config", "quickstart.yaml"]
    assert cmd[-1] == "method.data_proportion=0.5"
    assert f"training.init_from={os.path.abspath('src.pt')}" in cmd


def test_no_overrides_leaves_the_commands_as_they_were(monkeypatch, tmp_path):
    args = prediction_ablation.parse_args(["--out", str(tmp_path)])
    cmd = _first_command(monkeypatch, prediction_ablation,
                         lambda: prediction_ablation.train_and_score("28px-x", args, {}, None, None))
    assert cmd[-1] == "logging.tensorboard=false"


def test_scores_use_the_grid_ema_of_the_overridden_recipe():
    assert prediction_ablation.grid_ema([]) == prediction_ablation.config_lib.load_config(
        os.path.join(ROOT, "quickstart.yaml")).sampling.ema
    assert prediction_ablation.grid_ema(["training.ema_half_lives_kimg=[2,5,10,20]", "sampling.ema=3"]) == 3
