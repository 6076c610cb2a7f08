"""Run by test_compile.py under torchrun (2 processes, gloo): one pMF loss backward through DDP
around a compiled network (pmf.compile_model, then the wrap, as train.py does).

Each rank takes its half of a fixed float32 batch with its own draws (seeded by rank); rank 0
saves the loss, du/dt norm and all-reduced gradients to argv[1]; argv[2] is the backend.
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


def main(out_path, backend):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(dtype=torch.float32, recompute_v_head=True)
    net = DDP(pmf.compile_model(model, backend=backend))
    cfg = tiny_cfg()
    x, y = batch(8, dtype=torch.float32)
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    draws = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(100 + rank))
    loss, metrics = pmf.pmf_loss(net, x, y, draws, cfg)
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "du_dt_norm": metrics["du_dt_norm"],
                    "grads": {n: p.grad for n, p in net.module.named_parameters()}}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parallel.run_main(lambda: main(*sys.argv[1:3]))
