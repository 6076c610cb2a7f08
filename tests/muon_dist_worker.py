"""Run by test_optimizer.py: three MuonAdamW steps on fixed gradients, alone or under torchrun.

Five matrices with gradients (uneven over two ranks), one matrix without a gradient and one
vector. Saves the parameters and optimizer state of this rank to <prefix>_rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist

import optimizer
import parallel

SHAPES = [(32, 16), (16, 48), (24, 24), (8, 40), (40, 8), (12, 12), (20,)]


def main(prefix):
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    opt = optimizer.MuonAdamW([{"params": params[:-1], "use_muon": True}, {"params": params[-1:]}])
    for _ in range(3):
        for i, p in enumerate(params):
            p.grad = None if i == len(SHAPES) - 2 else torch.randn(p.shape, generator=gen)
        opt.step()
    torch.save({"params": [p.detach() for p in params], "start": start, "state": opt.state_dict()["state"]},
               f"{prefix}_rank{rank}.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    parallel.run_main(lambda: main(sys.argv[1]))
