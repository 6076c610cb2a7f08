"""Find the largest micro-batch whose real pMF training step fits, and write it into config.yaml.

    python auto_batch.py                                  # CUDA: the visible GPU's memory
    python auto_batch.py --max-memory 20GB --dry-run      # CPU: a peak-RSS budget, print only
    python auto_batch.py --config config.yaml --world-size 8 model.name=pMF-L/16

Each trial runs `--steps` full training steps (pMF loss with the JVP and the perceptual terms when
enabled, backward, Muon step, EMA update; optimizer state appears at the first step) at one
micro-batch in a fresh child process, so memory is measured from a clean start: on CUDA the peak
allocated memory (an OutOfMemoryError is a failure), on CPU the peak resident memory, the child
being stopped as soon as it exceeds the budget. The search doubles until a trial fails, then
bisects. The safety margin is memory: a batch fits when its peak stays within (1 - margin) of the
budget. The largest fitting batch is rounded down to a multiple of 8 when >= 8, then to the largest
micro-batch that divides the per-process share of the global batch.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

import config as config_lib

UNITS = {"": 1, "B": 1, "KB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30, "TB": 2 ** 40}


class AutoBatchError(RuntimeError):
    """The search cannot give a usable batch size; the message says why."""


def parse_bytes(text):
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise AutoBatchError(f"cannot read memory size {text!r}; use e.g. 20GB or 512MB")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def gb(n):
    return f"{n / 2 ** 30:.2f} GB"


# ---------------------------------------------------------------- one trial (child process)

def run_trial(cfg, batch, steps, device):
    """`steps` real training steps (train.train_step, the step train.py runs) at micro-batch
    `batch`, one process; returns (peak bytes, median step seconds)."""
    import dataset as data_lib
    import model as model_lib
    import pmf
    import train
    method = config_lib.method_config(cfg)
    torch.manual_seed(0)
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg)).to(device)
    parts = train.step_parts(cfg, net, method, device)
    data = data_lib.DummyImages(net.input_size, net.in_channels, method.num_classes, batch)
    x = torch.stack([data.load(i)[0] for i in range(batch)]).to(device)
    y = torch.tensor([data.load(i)[1] for i in range(batch)], device=device)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        draws = pmf.step_draws(method, range(batch), batch, x.shape[1:], 0, step, device)
        train.train_step(parts, [(x, y, draws)], 1, step, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return train.peak_memory_bytes(device), sorted(times)[len(times) // 2]


def _child_main(args):
    cfg = config_lib.load_config(args.config, args.overrides)
    device = torch.device(args.device)
    try:
        peak, seconds = run_trial(cfg, args.trial, args.steps, device)
        print(json.dumps({"ok": True, "peak": peak, "seconds": seconds}))
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"ok": False, "peak": None, "seconds": None}))


# ---------------------------------------------------------------- the search (parent process)

def measure(batch, args, budget):
    """Run one trial in a child; returns (fits, peak bytes, step seconds). The decision uses the
    child's own peak (CUDA allocated, or the kernel's resident high-water mark); on CPU the child
    is also killed as soon as its polled memory exceeds the budget, so a trial never swaps."""
    import psutil
    cmd = [sys.executable, os.path.abspath(__file__), "--trial", str(batch), "--steps", str(args.steps),
           "--device", args.device, "--config", args.config, *args.overrides]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, peak_own, over = psutil.Process(child.pid), 0, False
    while args.device == "cpu" and child.poll() is None:
        try:  # unique set size: right after fork the child shares all of this process's pages
            peak_own = max(peak_own, proc.memory_full_info().uss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
        if peak_own > budget:
            child.kill()
            over = True
            break
        time.sleep(0.05)
    out, err = child.communicate()
    if over:
        return False, peak_own, None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        raise AutoBatchError(f"trial at batch {batch} crashed:\n{err.strip()[-2000:]}")
    result = json.loads(lines[-1])
    return result["ok"] and result["peak"] <= budget, result["peak"], result["seconds"]


def search(measure_fn, budget, max_batch, start=1):
    """Largest batch b <= max_batch with measure_fn(b) fitting: doubling from `start`, then
    bisection (between 0 and `start` when `start` does not fit).

    Returns (best, rows) with rows = [(batch, fits, peak, seconds)] in trial order."""
    rows, best, high = [], 0, None
    batch = min(start, max_batch)
    while high is None and best < max_batch:
        fits, peak, seconds = measure_fn(batch)
        rows.append((batch, fits, peak, seconds))
        if not fits:
            high = batch
        else:
            best, batch = batch, min(batch * 2, max_batch)
    while high is not None and high - best > 1:
        mid = (best + high) // 2
        fits, peak, seconds = measure_fn(mid)
        rows.append((mid, fits, peak, seconds))
        best, high = (mid, high) if fits else (best, mid)
    if best == 0:
        peak = next(p for b, _, p, _ in rows if b == 1)
        needed = f"it needed {gb(peak)}" if peak else "it did not run"
        raise AutoBatchError(f"even batch 1 does not fit: {needed} against a budget of {gb(budget)}")
    return best, rows


def choose_micro(largest, global_batch, world):
    """The multiple-of-8 rounding of the largest fitting batch, then the largest micro-batch that
    divides global / world. Returns (micro, accum) with micro * world * accum == global."""
    if global_batch % world:
        raise AutoBatchError(f"global batch {global_batch} is not divisible by {world} processes; "
                             "set training.global_batch_size to a multiple of the world size")
    usable = max(1, largest)
    if usable >= 8:
        usable -= usable % 8
    per_rank = global_batch // world
    micro = max(m for m in range(1, min(usable, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def rewrite_config(text, micro, accum):
    """Set training.micro_batch_size and training.grad_accum_steps in YAML text; every other line
    stays byte-for-byte, and the edited lines keep their comments."""
    values = {"micro_batch_size": micro, "grad_accum_steps": accum}
    lines, section, seen = text.splitlines(keepends=True), None, set()
    for i, line in enumerate(lines):
        top = re.match(r"^(\w+)\s*:", line)
        if top:
            section = top.group(1)
        key = re.match(r"^(\s+(micro_batch_size|grad_accum_steps)\s*:\s*)(\S+)(.*)$", line, re.S)
        if section == "training" and key:
            lines[i] = f"{key.group(1)}{values[key.group(2)]}{key.group(4)}"
            seen.add(key.group(2))
    missing = sorted(set(values) - seen)
    if missing:
        raise AutoBatchError(f"config has no training.{missing[0]} line to update; add it under training:")
    return "".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Find the largest micro-batch that fits; write it into the config.")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-memory", default=None, help="budget, e.g. 38GB (default: the GPU's total memory)")
    p.add_argument("--margin", type=float, default=0.1, help="fraction of the memory budget kept free")
    p.add_argument("--world-size", type=int, default=None, help="processes that will train (default: GPUs here)")
    p.add_argument("--steps", type=int, default=2, help="training steps per trial (>= 2: optimizer state)")
    p.add_argument("--max-batch", type=int, default=None, help="largest micro-batch tried (default: global/world)")
    p.add_argument("--dry-run", action="store_true", help="print the result instead of writing the config")
    p.add_argument("--trial", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted config overrides used for the trials")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.trial is not None:
        return _child_main(args)
    try:
        cfg = config_lib.load_config(args.config, args.overrides)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise AutoBatchError("--device cuda but no CUDA device is visible; use --device cpu --max-memory SIZE")
        if args.steps < 2:
            raise AutoBatchError("--steps must be >= 2: optimizer state is allocated at the first step")
        if args.max_memory:
            budget = parse_bytes(args.max_memory)
        elif args.device == "cpu":
            raise AutoBatchError("on CPU pass --max-memory (the peak resident memory a process may use)")
        else:
            budget = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
        if not 0 <= args.margin < 1:
            raise AutoBatchError(f"--margin {args.margin} must be in [0, 1): the fraction of the budget kept free")
        usable = int(budget * (1 - args.margin))
        world = args.world_size or max(1, torch.cuda.device_count() if args.device != "cpu" else 1)
        global_batch = cfg.training.global_batch_size
        best, rows = search(lambda b: measure(b, args, usable), usable, args.max_batch or global_batch // world)
        micro, accum = choose_micro(best, global_batch, world)
    except (AutoBatchError, config_lib.ConfigError) as err:
        sys.exit(f"auto_batch: {err}")
    print(f"{'batch':>7s} {'fits':>5s} {'peak memory':>12s} {'step s':>8s}   (budget {gb(budget)} less margin "
          f"{args.margin:g} = {gb(usable)}, {args.device})")
    for batch, fits, peak, seconds in sorted(rows):
        print(f"{batch:7d} {'yes' if fits else 'no':>5s} {gb(peak) if peak else '-':>12s} "
              f"{f'{seconds:.3f}' if seconds else '-':>8s}")
    print(f"largest fitting micro-batch {best}: micro_batch_size {micro} x {world} processes x grad_accum_steps "
          f"{accum} = global batch {global_batch}")
    if args.dry_run:
        print("dry run: config not changed")
        return
    with open(args.config) as f:
        text = f.read()
    with open(args.config, "w") as f:
        f.write(rewrite_config(text, micro, accum))
    config_lib.load_config(args.config)
    print(f"wrote training.micro_batch_size={micro} and training.grad_accum_steps={accum} to {args.config}")


if __name__ == "__main__":
    main()
