"""Run by test_fsdp.py under torchrun (gloo): three MuonAdamW steps on FSDP2-sharded parameters
with fixed full gradients, for a module of odd shapes and for the tiny pMF model sharded as
train.py does, on a 1-D mesh (fsdp) or a replicate x shard mesh (hsdp, argument "RxS"); rank 0
saves the full parameters, the first one's optimizer state and each rank's Newton-Schulz work
(elements orthogonalised on the odd shapes).

`make_params` and `gradients` are shared with the test's one-process reference. The shapes shard
unevenly over two ranks (7 and 3 rows, a 1-row matrix whose second shard is empty, a 3-D tensor);
one matrix never gets a gradient.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optimizer  # noqa: E402
import parallel  # noqa: E402
from conftest import tiny_model  # noqa: E402

SHAPES = [(32, 16), (16, 48), (7, 9), (1, 5), (3, 4, 5), (24, 24), (20,), (7, 3)]
MUON, NO_GRAD, STEPS = 6, 5, 3


def make_params():
    """A module holding one parameter per SHAPES entry (seeded, the same on every rank)."""
    gen = torch.Generator().manual_seed(0)
    holder = torch.nn.Module()
    holder.params = torch.nn.ParameterList(torch.randn(*s, generator=gen) for s in SHAPES)
    return holder


def make_optimizer(params):
    return optimizer.MuonAdamW([{"params": params[:MUON], "use_muon": True}, {"params": params[MUON:]}],
                               weight_decay=0.1, adam_weight_decay=0.1)


def gradients(step, shapes=SHAPES, no_grad=NO_GRAD):
    """Full gradients of step `step`: one (shape) tensor per parameter, None at index `no_grad`."""
    gen = torch.Generator().manual_seed(1 + step)
    return [None if i == no_grad else torch.randn(s, generator=gen) for i, s in enumerate(shapes)]


def tiny_optimizer(net):
    """MuonAdamW over the official partition of `net` (build it after sharding: fully_shard
    replaces the parameters)."""
    return optimizer.MuonAdamW(optimizer.partition(net), weight_decay=0.1)


def run_steps(params, opt, shapes, no_grad, to_grad=lambda g, p: g):
    """STEPS optimizer steps on `gradients`, each placed on its parameter by `to_grad`."""
    for step in range(STEPS):
        for p, g in zip(params, gradients(step, shapes, no_grad)):
            p.grad = None if g is None else to_grad(g, p)
        opt.step()


def counting(ns_work, newton_schulz):
    """newton_schulz that adds the elements of each matrix it orthogonalises to ns_work[0]."""
    def count(g, *args):
        ns_work[0] += g.numel()
        return newton_schulz(g, *args)
    return count


def main(out_path, mesh_shape=None):
    dist.init_process_group("gloo")
    shape = tuple(int(n) for n in mesh_shape.split("x")) if mesh_shape else (dist.get_world_size(),)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    to_grad = lambda g, p: distribute_tensor(g, mesh, p.placements)  # noqa: E731
    holder = make_params()
    fully_shard(holder, mesh=mesh)
    params = list(holder.parameters())
    opt = make_optimizer(params)
    ns_work, newton_schulz = [0], optimizer.newton_schulz
    optimizer.newton_schulz = counting(ns_work, newton_schulz)
    run_steps(params, opt, SHAPES, NO_GRAD, to_grad)
    optimizer.newton_schulz = newton_schulz
    work = [None] * dist.get_world_size()
    dist.all_gather_object(work, ns_work[0])
    full = [p.full_tensor() for p in params]
    state = {i: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in s.items()}
             for i, s in opt.state_dict()["state"].items()}
    net = parallel.shard_model(tiny_model(dtype=torch.float32), mesh, "no")
    tiny = list(net.parameters())
    run_steps(tiny, tiny_optimizer(net), [p.shape for p in tiny], None, to_grad)
    tiny_full = [p.full_tensor() for p in tiny]
    if dist.get_rank() == 0:
        torch.save({"params": full, "state": state, "tiny": tiny_full, "ns_work": work}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    parallel.run_main(lambda: main(*sys.argv[1:]))
