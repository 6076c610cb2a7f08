"""checkpoint.py: atomic writes, a full disk, pruning that never deletes newer files, resume
selection with fallback past unreadable files, branching refusal, config comparison."""
import errno
import os

import pytest
import torch

import checkpoint
import config


def fake_state(step, cfg=None):
    cfg = cfg or config.load_config(None)
    return {"step": step, "model": {"w": torch.full((2,), float(step))}, "emas": [], "optimizer": {},
            "scaler": {}, "counters": {}, "config": config.to_dict(cfg)}


def write(out_dir, *steps, keep_last=10):
    for step in steps:
        checkpoint.save(checkpoint.path_for(str(out_dir), step), fake_state(step), keep_last)


def steps_in(out_dir):
    return [checkpoint.step_of(p) for p in checkpoint.paths(str(out_dir))]


def test_save_writes_the_format_version_and_keeps_the_last_k(tmp_path):
    write(tmp_path, 1, 2, 3, 4, keep_last=2)
    assert steps_in(tmp_path) == [3, 4]
    assert checkpoint.read(checkpoint.path_for(str(tmp_path), 4))["format"] == checkpoint.FORMAT_VERSION
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_pruning_never_deletes_a_checkpoint_newer_than_the_one_written(tmp_path):
    write(tmp_path, 2, 4, 6)
    write(tmp_path, 3, keep_last=1)
    assert steps_in(tmp_path) == [3, 4, 6]


def test_a_full_disk_names_the_file_removes_the_partial_write_and_keeps_older_ones(tmp_path, monkeypatch):
    write(tmp_path, 1, 2)

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="could not write ckpt-00000003.pt .*no space left"):
        write(tmp_path, 3, keep_last=1)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    assert checkpoint.read(checkpoint.path_for(str(tmp_path), 2))["step"] == 2


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_auto_resume_skips_an_unreadable_newest_checkpoint(tmp_path, damage):
    write(tmp_path, 1, 2, 3)
    newest = checkpoint.path_for(str(tmp_path), 3)
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[:len(data) // 2] if damage == "truncated" else b"")
    warnings = []
    path, state = checkpoint.select_resume("auto", str(tmp_path), warn=warnings.append)
    assert path == checkpoint.path_for(str(tmp_path), 2) and state["step"] == 2
    assert len(warnings) == 1 and "ckpt-00000003.pt is truncated or not a torch file" in warnings[0]
    assert checkpoint.select_resume("auto", str(tmp_path / "empty")) == (None, None)
    assert checkpoint.select_resume("", str(tmp_path)) == (None, None)


def test_resuming_an_older_checkpoint_into_a_folder_with_newer_ones_is_refused(tmp_path):
    write(tmp_path, 2, 4)
    old = checkpoint.path_for(str(tmp_path), 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"newer than .*logging.out_dir=NEW_DIR --resume"):
        checkpoint.select_resume(old, str(tmp_path))
    assert checkpoint.select_resume(old, str(tmp_path / "branch"))[1]["step"] == 2  # a new folder branches
    assert checkpoint.select_resume(checkpoint.path_for(str(tmp_path), 4), str(tmp_path))[1]["step"] == 4


def test_a_weights_only_file_or_a_damaged_one_is_not_a_training_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a training checkpoint .*training.init_from.*eval.py"):
        checkpoint.load_training(str(tmp_path / "weights.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(checkpoint.CheckpointError, match="junk.pt is truncated or not a torch file"):
        checkpoint.load_training(str(tmp_path / "junk.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load_training(str(tmp_path / "missing.pt"))


def test_config_changes_that_alter_the_run_are_named_and_others_pass():
    saved = config.load_config(None)
    state = fake_state(5, saved)
    harmless = config.load_config(None, ["logging.log_every=7", "logging.out_dir=elsewhere", "training.max_steps=9",
                                         "training.micro_batch_size=16", "data.num_workers=2"])
    checkpoint.check_resume_config(state, harmless, "ckpt.pt")
    changed = config.load_config(None, ["model.depth=12", "training.seed=3", "training.global_batch_size=512"])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_resume_config(state, changed, "ckpt.pt")
    message = str(err.value)
    for key in ("model.depth: None -> 12", "training.seed: 0 -> 3", "training.global_batch_size: 1024 -> 512",
                "--allow-config-change"):
        assert key in message
    assert "log_every" not in message
    warnings = []
    checkpoint.check_resume_config(state, changed, "ckpt.pt", allow_change=True, warn=warnings.append)
    assert len(warnings) == 1 and "no longer the same run" in warnings[0]
