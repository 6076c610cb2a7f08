"""Per-rank bytes of parameters + gradients + optimizer state (and the EMAs, listed apart), ddp vs
fsdp. Run by hand; prints markdown tables.

    python benchmarks/memory.py [--world 8]

Measured: two gloo processes on CPU (torchrun, started by this script) take one pMF step of a
tiny and a B-shaped (B width, shallow, 32 px) model, as ddp (torch DDP, what Accelerate wraps)
and as fsdp (parallel.shard_model), and count the bytes of the tensors each rank holds after
the optimizer step: parameters, .grad, optimizer state and EMAs (local shards for DTensors).
DDP's gradient buckets (another copy of the gradients) and activations are not counted.
Arithmetic: the same count from each preset's parameter shapes (meta device, fp32, rank 0's
shard, the largest under torch.chunk), for `--world` processes.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_lib  # noqa: E402
import optimizer as optim_lib  # noqa: E402

EMAS = 3  # config.yaml's ema_half_lives_kimg
SHAPES = {  # measured models: the tiny test model and a B-wide shallow one
    "tiny": dict(input_size=16, in_channels=3, num_classes=10, depth=3, hidden_size=32, num_heads=2,
                 patch_size=4, head_depth=2),
    "B-shaped": dict(input_size=32, in_channels=3, num_classes=10, depth=4, hidden_size=768, num_heads=12,
                     patch_size=16, head_depth=2),
}


def shard_rows(rows, world):
    """Rows of rank 0's Shard(0) piece (torch.chunk: the largest)."""
    return -(-rows // world) if world > 1 else rows


def arithmetic(net, world, sharded):
    """{column: bytes} for rank 0, from parameter shapes: fp32 params, grads, Muon m, AdamW m and v."""
    muon, adamw = optim_lib.partition(net)
    count = lambda p: shard_rows(p.shape[0], world) * math.prod(p.shape[1:]) if sharded else p.numel()  # noqa: E731
    n_muon = sum(count(p) for p in muon["params"])
    n_adamw = sum(count(p) for p in adamw["params"])
    n = n_muon + n_adamw
    return {"params": 4 * n, "grads": 4 * n, "optimizer": 4 * (n_muon + 2 * n_adamw), "emas": 4 * EMAS * n}


def local_bytes(tensors):
    """Bytes of the tensors this rank holds (a DTensor's local shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in local)


def measure(out_path):
    """Under torchrun: one pMF step per (shape, mode); rank 0 writes {shape: {mode: {column: bytes}}}."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    import parallel
    import pmf
    import train

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, shape in SHAPES.items():
        results[name] = {}
        for mode in ("ddp", "fsdp"):
            torch.manual_seed(0)
            net = model_lib.build_model(None, **shape)
            wrapped = DDP(net) if mode == "ddp" else parallel.shard_model(net, mesh, "no")
            opt = optim_lib.MuonAdamW(optim_lib.partition(net))
            ema = train.EMA(net, [500, 1000, 2000], 0.05)
            cfg = pmf.PMFConfig.for_preset("pMF-B/16", num_classes=shape["num_classes"])
            gen = torch.Generator().manual_seed(rank)
            x = torch.rand(2, 3, shape["input_size"], shape["input_size"], generator=gen) * 2 - 1
            y = torch.randint(0, shape["num_classes"], (2,), generator=gen)
            pmf.pmf_loss(wrapped, x, y, pmf.sample_draws(cfg, x, gen), cfg)[0].backward()
            opt.step()
            params = list(net.parameters())
            results[name][mode] = {
                "params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
                "optimizer": local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
                "emas": local_bytes(p for e in ema.params for p in e),
                "arithmetic": arithmetic(net, world, mode == "fsdp"),
            }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def row(label, ddp, fsdp):
    """A markdown row: the three training columns, their total, the ratio, and the EMAs."""
    total = lambda b: b["params"] + b["grads"] + b["optimizer"]  # noqa: E731
    mib = lambda b: f"{b / 2 ** 20:.2f} MiB" if b < 2 ** 30 else f"{b / 2 ** 30:.2f} GiB"  # noqa: E731
    cells = [f"{mib(ddp[k])} / {mib(fsdp[k])}" for k in ("params", "grads", "optimizer")]
    return (f"| {label} | " + " | ".join(cells) + f" | {mib(total(ddp))} / {mib(total(fsdp))} | "
            f"{total(fsdp) / total(ddp):.3f} | {mib(ddp['emas'])} / {mib(fsdp['emas'])} |")


HEADER = ("| model | params ddp / fsdp | grads | optimizer | total (p+g+o) | fsdp / ddp | EMAs (x3) |\n"
          "|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8, help="processes for the per-preset arithmetic")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the torchrun worker's output file
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.abspath(__file__), "--measure", out], check=True, env=env, capture_output=True)
        with open(out) as f:
            measured = json.load(f)
    print("Measured, world 2, CPU/gloo, per rank (rank 0), after one optimizer step:\n")
    print(HEADER)
    for name, modes in measured.items():
        print(row(f"{name} (measured)", modes["ddp"], modes["fsdp"]))
        print(row(f"{name} (arithmetic)", modes["ddp"]["arithmetic"], modes["fsdp"]["arithmetic"]))
    for world in sorted({2, args.world}):
        print(f"\nArithmetic, world {world}, fp32, per rank (rank 0):\n")
        print(HEADER)
        for preset in model_lib.PRESETS:
            with torch.device("meta"):
                net = model_lib.build_model(preset)
            print(row(f"{preset} ({sum(p.numel() for p in net.parameters()) / 1e6:.0f}M)",
                      arithmetic(net, world, False), arithmetic(net, world, True)))


if __name__ == "__main__":
    main()
