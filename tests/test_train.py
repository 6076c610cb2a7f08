"""train.py end to end on tiny models: resume exactness, preemption, DDP/accumulation equivalence,
Parquet with a corrupt image, non-finite steps, start-up errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import pmf
import train
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
    assert a["step"] == 4 and a["data"]["step"] == 4 and len(a["rng"]) == 1
    assert config.from_dict(a["config"]).training.max_steps == 4
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path / "straight"))
    lines = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for key in ("loss_u", "mse_u", "mse_v", "du_dt_norm", "grad_norm", "img_per_s", "peak_mem_gb", "skipped_images"):
        assert key in lines[-1]
    assert os.path.isfile(tmp_path / "straight" / "samples-00000004.png")


def test_keep_last_checkpoints(tmp_path):
    run(tmp_path, "training.max_steps=6", "logging.ckpt_every=1", "logging.keep_last=2")
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000005.pt", "ckpt-00000006.pt", "config.yaml", "metrics.jsonl",
                                            "samples-00000006.png"]


def test_accumulation_and_two_processes_match_one_process(tmp_path):
    run(tmp_path / "one", "training.max_steps=3")
    run(tmp_path / "accum", "training.max_steps=3", "training.micro_batch_size=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--config", "config.yaml", *tiny(tmp_path / "ddp", "training.max_steps=3", "training.micro_batch_size=4")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600, capture_output=True)
    one = load(tmp_path / "one", 3)
    assert_same_state(one, load(tmp_path / "accum", 3), exact=False)
    assert_same_state(one, load(tmp_path / "ddp", 3), exact=False)
    assert len(load(tmp_path / "ddp", 3)["rng"]) == 2
    start = train.model_lib.build_model(None, **{k.split(".")[1]: int(v) for k, v in
                                                  (o.split("=") for o in tiny("x")[:8])})
    moved = sum((one["model"][n] - p).abs().sum() for n, p in start.state_dict().items())
    assert moved > 0.1  # the runs really trained


def test_sigterm_saves_a_checkpoint_and_the_run_completes_identically(tmp_path):
    run(tmp_path / "straight", "training.max_steps=30", "logging.ckpt_every=100")
    out = tmp_path / "preempted"
    cmd = [sys.executable, "train.py", "--config", "config.yaml",
           *tiny(out, "training.max_steps=30", "logging.ckpt_every=100")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "metrics.jsonl") and len(open(out / "metrics.jsonl").readlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output
    saved = train.checkpoint_paths(str(out))
    assert len(saved) == 1 and "stop requested" in output
    stopped_at = torch.load(saved[0], weights_only=True)["step"]
    assert 3 <= stopped_at < 30
    assert run(out, "training.max_steps=30", "logging.ckpt_every=100", resume="auto") == 30
    assert_same_state(load(tmp_path / "straight", 30), load(out, 30))


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
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps"):
        run(tmp_path / "two", "training.max_steps=8", "training.max_consecutive_nonfinite=2")
    assert [os.path.basename(p) for p in train.checkpoint_paths(str(tmp_path / "two"))] == ["ckpt-00000002.pt"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(tmp_path, precision):
    run(tmp_path, "training.max_steps=2", f"training.mixed_precision={precision}")
    ckpt = load(tmp_path, 2)
    assert ckpt["counters"]["skipped_steps"] <= 1 and all(torch.isfinite(p).all() for p in ckpt["model"].values())


def test_start_up_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        run(tmp_path, "data.source=parquet", f"data.path={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="resume checkpoint"):
        run(tmp_path, resume=str(tmp_path / "missing.pt"))
    result = subprocess.run([sys.executable, "train.py", "training.micro_batch_size=48"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "config error: training.global_batch_size 1024 is not a multiple" in result.stderr
    assert not train.checkpoint_paths(str(tmp_path))
