"""train.py end to end on tiny models: resume exactness, preemption, DDP/accumulation equivalence,
Parquet with a corrupt image, non-finite steps, start-up errors."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

import checkpoint
import config
import pmf
import train
from launch import torchrun
from test_dataset import write_parquet_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(out_dir, *extra):
    return ["model.input_size=16", "model.in_channels=3", "model.num_classes=10", "model.depth=3",
            "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4", "model.head_depth=2",
            "perceptual.lpips=false", "perceptual.convnext=false", "data.source=dummy", "data.dummy_size=64",
            "data.num_workers=0", "training.global_batch_size=8", "training.micro_batch_size=8",
            "training.max_steps=4", "training.ema_half_lives_kimg=[0.01, 0.05]", f"logging.out_dir={out_dir}",
            "logging.log_every=1", "logging.ckpt_every=2", "logging.sample_every=100", "logging.sample_grid=4",
            "logging.tensorboard=false", *extra]


def run(out_dir, *extra, resume=None):
    return train.train(config.load_config(None, tiny(out_dir, *extra)), resume)


def load(out_dir, step):
    return torch.load(os.path.join(out_dir, f"ckpt-{step:08d}.pt"), weights_only=True)


def assert_same_state(a, b, exact=True):
    close = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-6))
    for name in a["model"]:
        assert close(a["model"][name], b["model"][name]), name
    for ema_a, ema_b in zip(a["emas"], b["emas"]):
        assert all(close(ema_a[n], ema_b[n]) for n in ema_a)
    if exact:
        for key, state in a["optimizer"]["state"].items():
            other = b["optimizer"]["state"][key]
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(other[k])) for k, v in state.items())


def test_resume_continues_bit_exactly(tmp_path):
    assert run(tmp_path / "straight") == 4
    run(tmp_path / "split", "training.max_steps=2")
    assert run(tmp_path / "split", resume="auto") == 4
    a, b = load(tmp_path / "straight", 4), load(tmp_path / "split", 4)
    assert_same_state(a, b)
    assert a["step"] == 4 and a["format"] == checkpoint.FORMAT_VERSION and len(a["rng"]) == 1
    assert config.from_dict(a["config"]).training.max_steps == 4
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path / "straight"))
    lines = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for key in ("loss_u", "mse_u", "mse_v", "du_dt_norm", "grad_norm", "img_per_s", "peak_mem_gb", "skipped_images"):
        assert key in lines[-1]
    assert os.path.isfile(tmp_path / "straight" / "samples-00000004.png")


def test_lr_decay_tail_steps_with_the_lr_of_lr_at(tmp_path):
    """optim.decay_fraction 0.5 of 4 steps: lr 1e-3, 1e-3, 1e-3, 5e-4. Reference: the constant-lr
    path for 3 steps, resumed for the 4th with optim.lr 5e-4: the same parameters and EMAs, bit for bit."""
    assert run(tmp_path / "decay", "optim.decay_fraction=0.5") == 4
    lines = [json.loads(line) for line in open(tmp_path / "decay" / "metrics.jsonl")]
    assert [r["lr"] for r in lines] == [1e-3, 1e-3, 1e-3, 5e-4]
    run(tmp_path / "constant", "training.max_steps=3")
    cfg = config.load_config(None, tiny(tmp_path / "constant", "optim.lr=5e-4"))
    assert train.train(cfg, "auto", allow_config_change=True) == 4
    assert_same_state(load(tmp_path / "decay", 4), load(tmp_path / "constant", 4))
    optim = config.OptimConfig(lr=2.0, decay_fraction=0.25)
    assert [train.lr_at(optim, k, 8) for k in range(8)] == [2.0] * 6 + [2.0, 1.0]
    assert train.lr_at(config.OptimConfig(lr=2.0), 7, 8) == 2.0


def test_keep_last_checkpoints(tmp_path):
    run(tmp_path, "training.max_steps=6", "logging.ckpt_every=1", "logging.keep_last=2")
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000005.pt", "ckpt-00000006.pt", "config.yaml", "metrics.jsonl",
                                            "samples-00000006.png"]


def test_accumulation_and_two_processes_match_one_process(tmp_path):
    run(tmp_path / "one", "training.max_steps=3")
    run(tmp_path / "accum", "training.max_steps=3", "training.micro_batch_size=4")
    torchrun("train.py", "--config", "config.yaml", *tiny(tmp_path / "ddp", "training.max_steps=3",
                                                           "training.micro_batch_size=4"), fresh=[tmp_path / "ddp"])
    one = load(tmp_path / "one", 3)
    assert_same_state(one, load(tmp_path / "accum", 3), exact=False)
    assert_same_state(one, load(tmp_path / "ddp", 3), exact=False)
    assert len(load(tmp_path / "ddp", 3)["rng"]) == 2
    start = train.model_lib.build_model(None, **{k.split(".")[1]: int(v) for k, v in
                                                  (o.split("=") for o in tiny("x")[:8])})
    moved = sum((one["model"][n] - p).abs().sum() for n, p in start.state_dict().items())
    assert moved > 0.1  # the runs really trained


def _signal_after_three_log_lines(proc, out, send):
    """Wait for three lines of out/metrics.jsonl, call send(), return the process's output."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "metrics.jsonl") and len(open(out / "metrics.jsonl").readlines()) >= 3:
            send()
            break
        time.sleep(0.05)
    return (proc.communicate(timeout=180)[0] or b"").decode()


def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path):
    # Slurm signals the whole process group: the DataLoader worker must not die first
    run(tmp_path / "straight", "training.max_steps=30", "logging.ckpt_every=100")
    out = tmp_path / "preempted"
    cmd = [sys.executable, "train.py", "--config", "config.yaml",
           *tiny(out, "training.max_steps=30", "logging.ckpt_every=100", "data.num_workers=1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output = _signal_after_three_log_lines(proc, out, lambda: os.killpg(proc.pid, signal.SIGTERM))
    assert proc.returncode == 0, output
    saved = checkpoint.paths(str(out))
    assert len(saved) == 1 and "stop requested" in output and "Traceback" not in output
    stopped_at = torch.load(saved[0], weights_only=True)["step"]
    assert 3 <= stopped_at < 30
    assert run(out, "training.max_steps=30", "logging.ckpt_every=100", resume="auto") == 30
    assert_same_state(load(tmp_path / "straight", 30), load(out, 30))


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resumes_on_one_process(tmp_path):
    run(tmp_path / "straight", "training.max_steps=30", "logging.ckpt_every=100")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--config", "config.yaml", *tiny(out, "training.max_steps=30", "logging.ckpt_every=100",
                                             "training.micro_batch_size=4", "data.num_workers=1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    output = _signal_after_three_log_lines(proc, out, lambda: proc.send_signal(signal.SIGTERM))
    saved = checkpoint.paths(str(out))
    assert len(saved) == 1 and output.count("stop requested") == 1, output
    assert "ChildFailedError" not in output and "exitcode" not in output, output  # no rank failed
    state = torch.load(saved[0], weights_only=True)
    assert 3 <= state["step"] < 30 and len(state["rng"]) == 2
    assert run(out, "training.max_steps=30", "logging.ckpt_every=100", resume="auto") == 30  # now 1 process
    assert_same_state(load(tmp_path / "straight", 30), load(out, 30), exact=False)


def test_ranks_whose_launcher_is_killed_stop_with_a_checkpoint_instead_of_running_on(tmp_path):
    out = tmp_path / "orphans"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--config", "config.yaml", *tiny(out, "training.max_steps=200", "logging.ckpt_every=1000",
                                             "training.micro_batch_size=4")]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    ranks = []

    def kill_the_launcher():
        ranks.extend(psutil.Process(launcher.pid).children())
        launcher.kill()

    _signal_after_three_log_lines(launcher, out, kill_the_launcher)
    assert len(ranks) == 2
    gone, alive = psutil.wait_procs(ranks, timeout=180)
    for proc in alive:
        proc.kill()
    assert not alive and len(checkpoint.paths(str(out))) == 1
    assert torch.load(checkpoint.paths(str(out))[0], weights_only=True)["step"] < 200


def test_parquet_with_a_corrupt_image_trains_and_counts_it(tmp_path):
    write_parquet_imagenet(tmp_path / "data", n=24, corrupt=(5,))
    run(tmp_path / "run", "data.source=parquet", f"data.path={tmp_path / 'data'}", "model.num_classes=3",
        "training.max_steps=3")  # 24 rows / batch 8: every row once
    assert load(tmp_path / "run", 3)["counters"]["skipped_images"] == 1
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])["skipped_images"] == 1


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    original, calls = pmf.pmf_loss, []

    def sometimes_nan(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) in poisoned else loss), metrics

    monkeypatch.setattr(pmf, "pmf_loss", sometimes_nan)
    poisoned = {2}
    run(tmp_path / "one", "training.max_steps=4")
    ckpt = load(tmp_path / "one", 4)
    assert ckpt["counters"]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())
    calls.clear()
    poisoned = set(range(3, 100))
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps") as stopped:
        run(tmp_path / "two", "training.max_steps=8", "training.max_consecutive_nonfinite=2")
    assert str(stopped.value).endswith("the last good checkpoint is "
                                       f"{tmp_path / 'two' / 'ckpt-00000002.pt'} (try bf16 or fp32, a lower lr)")
    assert [os.path.basename(p) for p in checkpoint.paths(str(tmp_path / "two"))] == ["ckpt-00000002.pt"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(tmp_path, precision):
    run(tmp_path, "training.max_steps=2", f"training.mixed_precision={precision}")
    ckpt = load(tmp_path, 2)
    assert ckpt["counters"]["skipped_steps"] <= 1 and all(torch.isfinite(p).all() for p in ckpt["model"].values())


def test_start_up_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        run(tmp_path / "new", "data.source=parquet", f"data.path={tmp_path / 'nowhere'}")
    assert not os.path.exists(tmp_path / "new")  # nothing written before the data is found
    with pytest.raises(checkpoint.CheckpointError, match="resume checkpoint"):
        run(tmp_path, resume=str(tmp_path / "missing.pt"))
    result = subprocess.run([sys.executable, "train.py", "training.micro_batch_size=48"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "config error: training.global_batch_size 1024 is not a multiple" in result.stderr
    assert not checkpoint.paths(str(tmp_path))


def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_older_checkpoints(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(checkpoint.CheckpointError, match="could not write ckpt-00000002.pt .*no space left on device"):
        run(tmp_path, "logging.ckpt_every=1")
    assert [p for p in os.listdir(tmp_path) if p.startswith("ckpt")] == ["ckpt-00000001.pt"]


def test_resume_refuses_a_config_that_changes_the_run_unless_asked(tmp_path):
    run(tmp_path, "training.max_steps=2")
    with pytest.raises(checkpoint.CheckpointError, match="method.P_mean: None -> 0.1"):
        run(tmp_path, "training.max_steps=3", "method.P_mean=0.1", resume="auto")
    cfg = config.load_config(None, tiny(tmp_path, "training.max_steps=3", "method.P_mean=0.1"))
    assert train.train(cfg, "auto", allow_config_change=True) == 3


def test_a_second_job_on_the_same_out_dir_is_refused(tmp_path):
    held = train.OutDirLock(str(tmp_path), is_main=True)
    try:
        with pytest.raises(config.ConfigError, match=f"{tmp_path} is in use by another training job \\(pid "):
            train.OutDirLock(str(tmp_path), is_main=True)
    finally:
        held.release()
    train.OutDirLock(str(tmp_path), is_main=True).release()  # free again
    assert not os.path.exists(tmp_path / ".lock")


@pytest.mark.parametrize("global_batch, micro, world, expected", [(64, 64, 2, (32, 1)), (64, 64, 1, (64, 1)),
                                                                  (64, 16, 2, (16, 2)), (96, 48, 4, (24, 1))])
def test_micro_batch_is_lowered_to_split_the_global_batch(global_batch, micro, world, expected):
    cfg = config.load_config(None, [f"training.global_batch_size={global_batch}", f"training.micro_batch_size={micro}"])
    got_micro, got_accum, note = train.resolve_batch_split(cfg, world)
    assert (got_micro, got_accum) == expected and got_micro * world * got_accum == global_batch
    assert (note is None) == (got_micro == micro)


def test_batch_splits_that_cannot_hold_name_the_key_to_change():
    cfg = config.load_config(None, ["training.global_batch_size=64", "training.micro_batch_size=8"])
    with pytest.raises(config.ConfigError, match="cannot be split over 3 processes; set it to a multiple of 3"):
        train.resolve_batch_split(cfg, 3)
    cfg = config.load_config(None, ["training.global_batch_size=64", "training.micro_batch_size=8",
                                    "training.grad_accum_steps=4"])
    with pytest.raises(config.ConfigError, match="training.grad_accum_steps 4 != training.global_batch_size 64"):
        train.resolve_batch_split(cfg, 1)


def test_the_closing_evaluate_command_names_a_config_eval_reads(tmp_path, capsys):
    run(tmp_path / "run", "training.max_steps=2")
    line = [s for s in capsys.readouterr().out.splitlines() if "evaluate: python eval.py" in s][-1]
    words = line.split("evaluate: ")[1].split()
    assert words[words.index("--ckpt") + 1] == str(tmp_path / "run" / "ckpt-00000002.pt")
    saved = config.load_config(words[words.index("--ref-from-config") + 1])
    assert saved.data.source == "dummy" and saved.model.hidden_size == 32
