"""Run by test_ddp.py under torchrun (2 processes, gloo): one pMF loss backward through DDP.

Each rank takes its half of a fixed batch with its own draws (seeded by rank, as per-rank RNG
streams in training) and rank 0 saves the all-reduced gradients to argv[1]; argv[2] is the du/dt
path (pmf.JVP_PATHS), argv[3] "recompute" to recompute the v-head in backward.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import batch, tiny_cfg, tiny_model  # noqa: E402

import parallel  # noqa: E402
import pmf  # noqa: E402


def main(out_path, jvp, recompute):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    model.recompute_v_head = recompute == "recompute"
    net = DDP(model)
    cfg = tiny_cfg(jvp=jvp)
    x, y = batch(8)
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    draws = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(100 + rank))
    loss, _ = pmf.pmf_loss(net, x, y, draws, cfg)
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in net.module.named_parameters()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parallel.run_main(lambda: main(*sys.argv[1:4]))
