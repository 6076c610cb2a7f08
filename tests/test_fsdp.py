"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU with gloo: sharded Muon, training, checkpoints."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import eval as eval_lib
import muon_fsdp_worker as muon_worker
import optimizer
import parallel
import pmf
import train
from launch import torchrun
from test_train import assert_same_state, load, run, tiny

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory  # noqa: E402


@pytest.mark.parametrize("mesh,nproc", [(None, 2), ("2x1", 2), ("2x2", 4)])
def test_sharded_muon_equals_the_unsharded_optimizer(tmp_path, mesh, nproc):
    """Owner-rank Newton-Schulz on gathered rows, scattered back (and, on an hsdp mesh, shared
    across replica groups): the parameters and (full) state after 3 steps equal MuonAdamW on whole
    tensors in one process, to 1e-6 (fp32 NS), for odd shapes and for the tiny pMF model sharded
    per block; each matrix is orthogonalised once per step, by one process of the whole world, in
    `_assign_owners`' balanced split (replicas do not repeat the work)."""
    torchrun(os.path.join(HERE, "muon_fsdp_worker.py"), str(tmp_path / "fsdp.pt"), *([mesh] if mesh else []),
             nproc=nproc)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    params = list(muon_worker.make_params().parameters())
    opt = muon_worker.make_optimizer(params)
    muon_worker.run_steps(params, opt, muon_worker.SHAPES, muon_worker.NO_GRAD)
    net = muon_worker.tiny_model(dtype=torch.float32)
    tiny = list(net.parameters())
    muon_worker.run_steps(tiny, muon_worker.tiny_optimizer(net), [p.shape for p in tiny], None)
    start = list(muon_worker.tiny_model(dtype=torch.float32).parameters())
    for i, (a, b, s) in enumerate(zip(sharded["tiny"], tiny, start)):
        assert (a - b).abs().max() < 1e-6 and (b - s).abs().max() > 1e-4, i
    for i, (a, b) in enumerate(zip(sharded["params"], params)):
        assert (a - b).abs().max() < 1e-6, i
    for key, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert (torch.as_tensor(sharded["state"][key][k]) - torch.as_tensor(v)).abs().max() < 1e-6, (key, k)
    start = list(muon_worker.make_params().parameters())
    assert torch.equal(params[muon_worker.NO_GRAD], start[muon_worker.NO_GRAD])
    assert all((p - s).abs().max() > 1e-3 for i, (p, s) in enumerate(zip(params, start)) if i != muon_worker.NO_GRAD)
    sizes = [math.prod(s) for i, s in enumerate(muon_worker.SHAPES[:muon_worker.MUON]) if i != muon_worker.NO_GRAD]
    owners = optimizer._assign_owners(sizes, nproc)
    expected = [muon_worker.STEPS * sum(n for n, o in zip(sizes, owners) if o == r) for r in range(nproc)]
    assert sharded["ns_work"] == expected and min(expected) > 0


# ---------------------------------------------------------------- train.py under fsdp / hsdp

STEPS = 5


def launch(out_dir, *extra, nproc=2, resume=None):
    """train.py on the tiny model under torchrun: 5 steps of 8 images, micro 2 (accumulation 2 on
    two processes), checkpoints at steps 2, 4 and 5."""
    args = ["train.py", "--config", "config.yaml",
            *tiny(out_dir, f"training.max_steps={STEPS}", "training.micro_batch_size=2", *extra)]
    return torchrun(*args, *(["--resume", resume] if resume else []), nproc=nproc, fresh=[] if resume else [out_dir])


def consolidated(out_dir, step):
    return checkpoint.read(checkpoint.consolidate(checkpoint.path_for(str(out_dir), step, sharded=True)))


def max_difference(a, b):
    """Largest |a - b| over the model, the EMAs and the optimizer's tensors of two checkpoints."""
    pairs = [(a["model"][n], b["model"][n]) for n in a["model"]]
    pairs += [(x[n], y[n]) for x, y in zip(a["emas"], b["emas"]) for n in x]
    pairs += [(v, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items() for k, v in s.items()
              if torch.is_tensor(v)]
    return max((x - y).abs().max().item() for x, y in pairs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-process ddp and fsdp runs of the same config (module-wide: several tests read them)."""
    root = tmp_path_factory.mktemp("runs")
    launch(root / "ddp")
    launch(root / "fsdp", "training.parallel=fsdp")
    return root


def test_fsdp_trains_like_ddp(runs):
    """Parameters, EMAs and optimizer state after 5 steps (with accumulation) equal DDP's to float32
    rounding (the tolerance of test_train's DDP equivalence)."""
    fsdp = consolidated(runs / "fsdp", STEPS)
    assert_same_state(load(runs / "ddp", STEPS), fsdp, exact=False)
    assert max_difference(load(runs / "ddp", STEPS), fsdp) < 1e-5
    assert sorted(os.listdir(runs / "fsdp" / "ckpt-00000004.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                      checkpoint.META]


def test_sharded_resume_is_bit_exact(runs, tmp_path):
    """Resuming the step-2 sharded checkpoint on two processes ends bit-exactly where the straight run did."""
    shutil.copytree(runs / "fsdp" / "ckpt-00000002.dcp", tmp_path / "ckpt-00000002.dcp")
    launch(tmp_path, "training.parallel=fsdp", resume="auto")
    assert_same_state(consolidated(runs / "fsdp", STEPS), consolidated(tmp_path, STEPS), exact=True)


def test_two_rank_checkpoint_resumes_on_one_rank_and_as_one_file(runs, tmp_path):
    """DCP reshards the 2-process step-4 checkpoint onto one fsdp process; the consolidated file
    resumes under ddp and under fsdp. All end at the straight run's step 5 to float32 rounding."""
    shutil.copytree(runs / "fsdp" / "ckpt-00000004.dcp", tmp_path / "one" / "ckpt-00000004.dcp")
    run(tmp_path / "one", f"training.max_steps={STEPS}", "training.micro_batch_size=2", "training.parallel=fsdp",
        resume="auto")
    straight = consolidated(runs / "fsdp", STEPS)
    assert_same_state(straight, consolidated(tmp_path / "one", STEPS), exact=False)
    os.makedirs(tmp_path / "file")
    single = checkpoint.consolidate(str(runs / "fsdp" / "ckpt-00000004.dcp"), str(tmp_path / "file" / "ckpt-00000004.pt"))
    run(tmp_path / "file", f"training.max_steps={STEPS}", "training.micro_batch_size=2", resume=single)
    assert_same_state(straight, load(tmp_path / "file", STEPS), exact=False)
    run(tmp_path / "file_fsdp", f"training.max_steps={STEPS}", "training.micro_batch_size=2",
        "training.parallel=fsdp", resume=single)
    assert_same_state(straight, consolidated(tmp_path / "file_fsdp", STEPS), exact=False)


def test_consolidated_file_loads_in_eval_and_the_cli_writes_it(runs, tmp_path):
    shutil.copytree(runs / "fsdp" / "ckpt-00000005.dcp", tmp_path / "ckpt-00000005.dcp")
    out = subprocess.run([sys.executable, "checkpoint.py", "consolidate", str(tmp_path / "ckpt-00000005.dcp")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
    path = str(tmp_path / "ckpt-00000005.pt")
    assert out.strip() == f"wrote {path}"
    state = checkpoint.read(path)
    assert checkpoint.is_training_checkpoint(state) and state["step"] == STEPS and len(state["rng"]) == 2
    net, _, which, _ = eval_lib.load_generator(path)
    assert which == "ema 0.05 kimg"
    assert torch.equal(net.trunk[0].attn.q.weight, state["emas"][-1]["trunk.0.attn.q.weight"])
    with pytest.raises(checkpoint.CheckpointError, match="python checkpoint.py consolidate"):
        checkpoint.read(str(tmp_path / "ckpt-00000005.dcp"))


def test_sharded_checkpoint_errors(runs, tmp_path):
    """ddp cannot resume a .dcp folder; a folder of another model cannot be resharded: one line each."""
    with pytest.raises(checkpoint.CheckpointError, match="resume it with training.parallel=fsdp"):
        run(tmp_path / "ddp", resume=str(runs / "fsdp" / "ckpt-00000004.dcp"))
    shutil.copytree(runs / "fsdp" / "ckpt-00000004.dcp", tmp_path / "other" / "ckpt-00000004.dcp")
    cfg = config.load_config(None, tiny(tmp_path / "other", "training.parallel=fsdp", "model.hidden_size=64"))
    with pytest.raises(checkpoint.CheckpointError, match="cannot be resharded onto this run"):
        train.train(cfg, "auto", allow_config_change=True)


def test_sharded_config_errors():
    bad = {"method.jvp=simple": "needs method.jvp=fast", "training.mixed_precision=fp16": "does not support",
           "training.compile=true": "not supported with training.parallel"}
    for override, message in bad.items():
        with pytest.raises(config.ConfigError, match=message):
            config.load_config(None, tiny("x", "training.parallel=fsdp", override))
    cfg = config.load_config(None, tiny("x", "training.parallel=hsdp", "training.hsdp_shard_size=3"))
    with pytest.raises(config.ConfigError, match="hsdp_shard_size 3 does not divide the 2 processes"):
        parallel.shard_size(cfg, 2)
    with pytest.raises(config.ConfigError, match="must be one of"):
        config.load_config(None, tiny("x", "training.parallel=zero3"))


@pytest.mark.parametrize("shard", [1, 2])
def test_hsdp_meshes_train_like_ddp(runs, tmp_path, shard):
    """hsdp at world 2: mesh 2 x 1 (replicated, shards of one) and 1 x 2 (one sharded group)."""
    launch(tmp_path, "training.parallel=hsdp", f"training.hsdp_shard_size={shard}")
    assert max_difference(load(runs / "ddp", STEPS), consolidated(tmp_path, STEPS)) < 1e-5


def test_row_counts_follow_torch_chunk():
    """The sharded Muon's row split (and the memory benchmark's rank-0 rows) is FSDP2's Shard(0),
    torch.chunk padded with empty shards."""
    for rows in range(1, 20):
        for world in range(1, 6):
            chunks = [c.shape[0] for c in torch.arange(rows).chunk(world)]
            assert optimizer._row_counts(rows, world) == chunks + [0] * (world - len(chunks))
            assert memory.shard_rows(rows, world) == chunks[0]


def test_fsdp_skips_a_non_finite_step_and_trains_in_bf16(tmp_path, monkeypatch):
    """One fsdp process: a NaN loss at step 2 is skipped (DTensor gradient norm, no update, no
    EMA update); bf16 (MixedPrecisionPolicy + autocast) takes finite steps."""
    original, calls = pmf.pmf_loss, []

    def nan_at_second_call(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    monkeypatch.setattr(pmf, "pmf_loss", nan_at_second_call)
    run(tmp_path / "nan", "training.max_steps=3", "training.parallel=fsdp")
    state = consolidated(tmp_path / "nan", 3)
    assert state["counters"]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in [*state["model"].values(), *state["emas"][0].values()])
    monkeypatch.setattr(pmf, "pmf_loss", original)
    run(tmp_path / "bf16", "training.max_steps=2", "training.parallel=fsdp", "training.mixed_precision=bf16")
    state = consolidated(tmp_path / "bf16", 2)
    assert state["counters"]["skipped_steps"] == 0 and all(torch.isfinite(p).all() for p in state["model"].values())


def test_keep_last_prunes_sharded_folders_and_auto_prefers_the_file(tmp_path):
    """keep_last counts .dcp folders and .pt files alike; at one step, --resume auto's newest is the
    one-file form (a consolidation); .dcp.tmp leftovers of a crash are no checkpoints."""
    for step in (1, 2, 3):
        os.makedirs(checkpoint.path_for(str(tmp_path), step, sharded=True))
    open(checkpoint.path_for(str(tmp_path), 3), "w").close()
    os.makedirs(str(tmp_path / "ckpt-00000004.dcp.tmp"))
    assert [os.path.basename(p) for p in checkpoint.paths(str(tmp_path))][-2:] == ["ckpt-00000003.dcp",
                                                                                   "ckpt-00000003.pt"]
    checkpoint._prune(checkpoint.path_for(str(tmp_path), 3, sharded=True), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000003.dcp", "ckpt-00000003.pt", "ckpt-00000004.dcp.tmp"]
