"""Sharded data parallelism for train.py: training.parallel = fsdp | hsdp on PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`) over a DeviceMesh; `ddp` (the default) stays with Accelerate.

fsdp: a 1-D mesh (world,), every parameter, gradient, optimizer state and EMA sharded by rows
over all processes. hsdp: a 2-D mesh (world / shard, shard) = (replicate, shard): sharded within
groups of `training.hsdp_shard_size` processes, replicated across the groups (gradients
reduce-scattered in a group, all-reduced across groups). Each transformer block and the root are
separate FSDP units, so a block's weights are whole only inside its forward and backward; the
pMF single-pass tangent runs inside those forwards (torch.func.jvp on a sharded module would see
shards, so method.jvp=simple is refused, see config.py).

`run_main` ends every script that can run under torchrun (train.py, eval.py, the test workers):
see its docstring for the gloo teardown crash it avoids.
"""
import atexit
import os
import sys
import threading

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import config as config_lib


def is_sharded(net):
    return isinstance(net, FSDPModule)


def ensure_process_group(device):
    """Initialise a one-process group when none exists (FSDP2 needs one even alone); True if
    this call made it (the caller then destroys it)."""
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    return True


def gloo_workers_alive():
    """True while a gloo process group's worker threads (named pt_gloo_runloop) run in this
    process; read from /proc/self/task, so False where there is no /proc (not Linux)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() == "pt_gloo_runloop":
                    return True
        except OSError:  # the thread ended while we listed
            pass
    return False


def run_main(main):
    """Run a script's `main()` and exit with its status; where gloo worker threads are still alive,
    end the process with os._exit after what a normal exit does first (non-daemon threads joined,
    atexit callbacks run, stdout and stderr flushed), skipping only the interpreter's teardown.

    Why: destroy_process_group does not stop gloo's worker threads while anything still holds the
    group (DTensor's sharding caches do after an FSDP run; torch._dynamo does when first imported
    after init_process_group). A worker that frees a finished collective's tensor just as the
    interpreter tears down needs the GIL, is killed inside a noexcept destructor and aborts the
    process (`terminate called without an active exception`, SIGABRT): a finished run then exits
    non-zero (torchrun reports exit 1). PyTorch's atexit proposal for it was closed unmerged
    (pytorch/pytorch PR 179291). Only gloo's threads are looked for: NCCL runs exit as before."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    if not gloo_workers_alive():
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): what the interpreter would print
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard_size(cfg, world):
    """Processes per shard group: world for fsdp; training.hsdp_shard_size (null: the processes per
    node, LOCAL_WORLD_SIZE) for hsdp, which must divide the world size."""
    t = cfg.training
    if t.parallel == "fsdp":
        return world
    size = t.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % size:
        raise config_lib.ConfigError(f"training.hsdp_shard_size {size} does not divide the {world} processes; set "
                                     f"it to a divisor of {world} (processes per shard group)")
    return size


def build_mesh(cfg, world, device):
    """The DeviceMesh of training.parallel: (world,) for fsdp, (world / shard, shard) for hsdp."""
    size = shard_size(cfg, world)
    if cfg.training.parallel == "fsdp":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))


def mp_policy(precision):
    """FSDP2 mixed precision for training.mixed_precision: bf16 parameters in the forward and
    backward with fp32 gradient reduction (autocast stays on for the ops between); fp32 otherwise."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def shard_model(net, mesh, precision):
    """fully_shard every transformer block (trunk, u-head, v-head), then the root (embedders,
    tokens, final layers), in place; returns net (now an FSDPModule)."""
    policy = mp_policy(precision)
    for blocks in (net.trunk, net.u_head, net.v_head or ()):
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def shard_like(tensor, param):
    """A whole tensor (the same on every process) as a DTensor laid out like `param`, no communication."""
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def full(tensor):
    """The whole tensor of a DTensor (a collective: every process calls it), a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_optimizer_state(opt):
    """After load_state_dict of a whole (unsharded) optimizer state: every per-parameter tensor
    sharded like its parameter."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and not isinstance(value, DTensor):
                    state[key] = shard_like(value, p)
