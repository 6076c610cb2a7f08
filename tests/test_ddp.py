"""The pMF loss under DistributedDataParallel: gradients flow through the wrapper and are averaged."""
import os

import pytest
import torch

import pmf
from conftest import batch, tiny_cfg, tiny_model
from launch import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("jvp,recompute", [("fast", "recompute"), ("simple", "store")])
def test_two_process_gradients_equal_the_average_of_per_rank_losses(jvp, recompute, tmp_path, rel_err):
    """Both du/dt paths through DDP (the default with the v-head recomputed in backward) against
    the simple path in one process (the reference)."""
    out = tmp_path / "grads.pt"
    torchrun(os.path.join(HERE, "ddp_loss_worker.py"), out, jvp, recompute, timeout=300)
    ddp_grads = torch.load(out, weights_only=True)

    net, cfg = tiny_model(), tiny_cfg(jvp="simple")
    x, y = batch(8)
    for rank, (xr, yr) in enumerate(zip(x.chunk(2), y.chunk(2))):
        draws = pmf.sample_draws(cfg, xr, torch.Generator().manual_seed(100 + rank))
        (pmf.pmf_loss(net, xr, yr, draws, cfg)[0] / 2).backward()
    for name, p in net.named_parameters():
        assert rel_err(ddp_grads[name], p.grad) < 1e-9, name
    per_rank_0 = tiny_model()
    draws = pmf.sample_draws(cfg, x[:4], torch.Generator().manual_seed(100))
    pmf.pmf_loss(per_rank_0, x[:4], y[:4], draws, cfg)[0].backward()
    grads_0 = torch.cat([p.grad.flatten() for p in per_rank_0.parameters()])
    assert rel_err(torch.cat([g.flatten() for g in ddp_grads.values()]), grads_0) > 1e-3  # really averaged
