"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU with gloo: sharded Muon, training, checkpoints."""
import os
import subprocess
import sys

import torch

import muon_fsdp_worker as muon_worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, timeout=600, capture_output=True)


def test_sharded_muon_equals_the_unsharded_optimizer(tmp_path):
    """Owner-rank Newton-Schulz on gathered rows, scattered back: the parameters and (full) state
    after 3 steps equal MuonAdamW on whole tensors in one process, to 1e-6 (fp32 NS)."""
    torchrun(os.path.join(HERE, "muon_fsdp_worker.py"), str(tmp_path / "fsdp.pt"))
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    params = list(muon_worker.make_params().parameters())
    opt = muon_worker.make_optimizer(params)
    for step in range(muon_worker.STEPS):
        for p, g in zip(params, muon_worker.gradients(step)):
            p.grad = g
        opt.step()
    for i, (a, b) in enumerate(zip(sharded["params"], params)):
        assert (a - b).abs().max() < 1e-6, i
    for key, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert (torch.as_tensor(sharded["state"][key][k]) - torch.as_tensor(v)).abs().max() < 1e-6, (key, k)
    start = list(muon_worker.make_params().parameters())
    assert torch.equal(params[muon_worker.NO_GRAD], start[muon_worker.NO_GRAD])
    assert all((p - s).abs().max() > 1e-3 for i, (p, s) in enumerate(zip(params, start)) if i != muon_worker.NO_GRAD)
