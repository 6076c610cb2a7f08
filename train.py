"""Train pMF. One process per GPU (or one CPU process):

    accelerate launch train.py [--config config.yaml] [section.key=value ...]
    torchrun --nproc_per_node=8 train.py [--config config.yaml] [section.key=value ...]
    python train.py --config quickstart.yaml          # tiny pMF on MNIST, CPU

The loop wires config -> model, pMF loss, Muon -> files. Each optimizer step consumes one global
batch (micro x processes x accumulation) whose rows, random draws and noise depend only on
(seed, step, row): any process/accumulation split trains the same, and resuming at step k
continues the exact run (docs/method.md §10.3 for the JVP/DDP design, §6 for the EMAs).

Sections: the training step (`forward_backward`, `train_step`: also run by auto_batch.py and the
benchmarks), the run's set-up (`train`) and its loop (`_loop`); checkpoints live in checkpoint.py.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import json
import math
import os
import resource
import signal
import socket
import sys
import time

import torch
import torchvision
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

import checkpoint as checkpoint_lib
import config as config_lib
import dataset as data_lib
import finetune
import model as model_lib
import optimizer as optim_lib
import parallel
import perceptual as perceptual_lib
import pmf

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train pixel MeanFlow (pMF).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="config.yaml", help="YAML config")
    parser.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the latest in out_dir")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although keys that change the run differ from the checkpoint's config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.global_batch_size=256")
    return parser.parse_args(argv)


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row); the message names the last good
    checkpoint."""


class EMA:
    """EDM half-life EMAs (docs/method.md §6): after optimizer step k with B images per step,
    half = min(H, ramp * k * B) images, beta = 0.5 ** (B / half); kept in fp32."""

    def __init__(self, net, half_lives_kimg, rampup):
        self.half_lives = [h * 1000 for h in half_lives_kimg]
        self.rampup = rampup
        self.names = [n for n, _ in net.named_parameters()]
        self.params = [[p.detach().float().clone() for p in net.parameters()] for _ in self.half_lives]

    @torch.no_grad()
    def update(self, net, step, images_per_step):
        current = [p.detach().float() for p in net.parameters()]
        for half_life, ema in zip(self.half_lives, self.params):
            half = min(half_life, self.rampup * step * images_per_step)
            beta = 0.5 ** (images_per_step / max(half, 1e-8))
            torch._foreach_lerp_(ema, current, 1 - beta)

    def state_dict(self, index):
        """EMA `index` as {name: tensor}, loadable with model.load_weights (sharded EMAs: a
        collective, every process calls it)."""
        return {n: parallel.full(p).cpu() for n, p in zip(self.names, self.params[index])}

    def state_dicts(self):
        return [self.state_dict(i) for i in range(len(self.params))]

    def load_state_dicts(self, dicts):
        for ema, saved in zip(self.params, dicts):
            for p, name in zip(ema, self.names):
                p.copy_(saved[name])


def resolve_batch_split(cfg, world):
    """(micro, accum) with micro x world x accum = global batch, and a note when micro was lowered.

    With grad_accum_steps null, micro_batch_size is an upper bound (a memory limit): it is lowered to
    the largest size that splits the global batch evenly over the processes."""
    t = cfg.training
    if t.global_batch_size % world:
        raise config_lib.ConfigError(f"training.global_batch_size {t.global_batch_size} cannot be split over {world} "
                                     f"processes; set it to a multiple of {world}")
    per_rank = t.global_batch_size // world
    if t.grad_accum_steps:
        if t.micro_batch_size * t.grad_accum_steps != per_rank:
            raise config_lib.ConfigError(
                f"training.micro_batch_size {t.micro_batch_size} x {world} processes x training.grad_accum_steps "
                f"{t.grad_accum_steps} != training.global_batch_size {t.global_batch_size}; change micro_batch_size "
                "or grad_accum_steps (or set grad_accum_steps: null to derive it)")
        return t.micro_batch_size, t.grad_accum_steps, None
    micro = max(m for m in range(1, min(t.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    note = None
    if micro != t.micro_batch_size:
        note = (f"training.micro_batch_size {t.micro_batch_size} lowered to {micro} so that {micro} x {world} processes "
                f"x {per_rank // micro} accumulation = global batch {t.global_batch_size}")
    return micro, per_rank // micro, note


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def autocast(precision, device):
    """The autocast context of training.mixed_precision: no (fp32) | bf16 | fp16."""
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                          enabled=precision != "no")


def peak_memory_bytes(device):
    """CUDA: the peak allocated bytes; CPU: this process's peak resident memory (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _ignore_stop_signals(_worker_id):
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which finishes the step and
    writes the stop checkpoint (schedulers and launchers signal the whole process group)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopFlag:
    """Set by SIGTERM/SIGINT (a preempted job); checked collectively at each step boundary.

    Under a launcher (torchrun, accelerate launch: LOCAL_RANK is set), the kernel also sends this
    process SIGTERM when the launcher dies, so ranks never run on as orphans."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        if "LOCAL_RANK" in os.environ and sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class OutDirLock:
    """An exclusive lock on out_dir/.lock held by the main process while it trains, so that a second
    job on the same folder (a restart racing the old one) stops with a clear message."""

    def __init__(self, out_dir, is_main):
        self.file = None
        if is_main:
            self.file = open(os.path.join(out_dir, ".lock"), "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                self.file = None
                raise config_lib.ConfigError(f"{out_dir} is in use by another training job ({holder}); wait for it to "
                                             "end or set logging.out_dir to another folder") from None
            except OSError:  # a file system without locks: run unlocked
                pass
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self.file.flush()

    def release(self):
        if self.file is not None:
            os.remove(self.file.name)
            self.file.close()
            self.file = None


def _all_ok(accelerator, ok):
    """True on every process iff `ok` is True on every process (one all-reduce)."""
    flag = torch.tensor(float(ok), device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() == accelerator.num_processes)


class Logger:
    """Main process: tqdm bar, stdout lines, metrics.jsonl, TensorBoard when installed and enabled."""

    SHOWN = ("mse_u", "mse_v", "du_dt_norm", "grad_norm")

    def __init__(self, accelerator, out_dir, total, start, tensorboard):
        self.main = accelerator.is_main_process
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.bar = tqdm(total=total, initial=start, disable=not self.main, dynamic_ncols=True)
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a") if self.main else None
        self.tb = None
        if self.main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def step(self):
        self.bar.update(1)

    def eta(self, step):
        rate = (time.perf_counter() - self.t0) / max(step - self.start, 1)
        return _clock(rate * (self.total - step))

    def write(self, record):
        if not self.main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
        shown = " ".join(f"{k} {record[k]:.4g}" for k in self.SHOWN if k in record)
        self.bar.write(f"step {record['step']}/{self.total}  {shown}  {record['img_per_s']:.0f} img/s  "
                       f"ETA {self.eta(record['step'])}")

    def message(self, text):
        if self.main:
            self.bar.write(text)

    def close(self):
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _clock(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Window:
    """Per-optimizer-step averages of the metrics between log lines, reduced over processes."""

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, metrics, weight=1.0):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + weight * v.detach().float()

    def end_step(self):
        self.steps += 1

    def summary(self, accelerator):
        sums = {k: accelerator.reduce(v.clone(), "sum" if k.startswith("t_bucket_") else "mean")
                for k, v in self.sums.items()}
        out = {k: (v / self.steps).item() for k, v in sums.items() if not k.startswith("t_bucket_")}
        if "t_bucket_count" in sums:
            counts, width = sums["t_bucket_count"].tolist(), 1 / len(sums["t_bucket_count"])
            for k, (s, c) in enumerate(zip(sums["t_bucket_sum_mse_u"].tolist(), counts)):
                if c:
                    out[f"mse_u_t{k * width:.2f}-{(k + 1) * width:.2f}"] = s / c
        self.sums, self.steps = {}, 0
        return out


def sampling_network(cfg, method_cfg, device):
    """The inference build (no v-head) that draws the sample grids, on the CPU; compiled, as the
    training network, when training.compile resolves to on for the accelerator. It is built once per
    run and gets each grid's EMA weights in place, so a compiled graph is captured at the first grid
    and reused by every later one (same shapes, same parameter tensors)."""
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg), with_v_head=False).eval()
    if pmf.compile_wanted(cfg.training.compile, method_cfg.jvp, device):
        pmf.compile_model(net)
    return net


@torch.no_grad()
def save_samples(path, net, ema_state, cfg, method_cfg, device):
    """One-step samples of an EMA with fixed noise and labels (row i of the grid: class i mod K).

    net: `sampling_network`'s build; it holds the EMA on `device` while drawing and goes back to the
    CPU after, so the accelerator keeps no second copy of the model between grids."""
    model_lib.load_weights(net, ema_state, source="EMA")
    net.to(device)
    n = cfg.logging.sample_grid
    gen = torch.Generator().manual_seed(cfg.training.seed)
    noise = torch.randn(n, net.in_channels, net.input_size, net.input_size, generator=gen)
    nrow = math.ceil(math.sqrt(n))
    labels = (torch.arange(n) // nrow) % method_cfg.num_classes
    s = cfg.sampling
    x = pmf.sample(net, noise.to(device), labels.to(device), s.omega, s.t_min, s.t_max, method_cfg, steps=s.steps)
    net.to("cpu")
    torchvision.utils.save_image((x.float().cpu() + 1) / 2, path, nrow=nrow)
    return labels[::nrow].tolist()


def build_perceptual(cfg, method_cfg, device):
    use_lpips = cfg.perceptual.lpips and method_cfg.lpips_weight > 0
    use_convnext = cfg.perceptual.convnext and method_cfg.convnext_weight > 0
    loss = perceptual_lib.build_perceptual(use_lpips, use_convnext, cfg.perceptual.vgg16_path,
                                           cfg.perceptual.convnext_path)
    return loss.to(device) if loss is not None else None


def build_optimizer(cfg, net):
    """Muon + Nesterov AdamW over the network's parameters, as `cfg.optim` says."""
    o = cfg.optim
    return optim_lib.MuonAdamW(optim_lib.partition(net, o.partition), lr=o.lr, momentum=o.momentum, eps=o.eps,
                               weight_decay=o.weight_decay, adam_betas=o.adam_betas,
                               adam_weight_decay=o.adam_weight_decay, adjust_lr=o.adjust_lr,
                               ns_dtype=getattr(torch, o.ns_dtype))


def lr_at(optim_cfg, step, total):
    """The lr of optimizer step `step` (0-based) of a `total`-step run: optim.lr, and over the last
    n = round(decay_fraction x total) steps lr x (total - step) / n, down to lr / n at the last
    step (a decay-to-zero tail; decay_fraction 0 is the paper's constant lr)."""
    n = round(optim_cfg.decay_fraction * total)
    return optim_cfg.lr * min(1.0, (total - step) / n) if n else optim_cfg.lr


# ---------------------------------------------------------------- the training step

@dataclasses.dataclass
class StepParts:
    """What a training step touches. accelerator None: one process, no wrapper (auto_batch's
    trials); opt/ema None: gradients only (benchmarks)."""
    net: torch.nn.Module
    method_cfg: pmf.PMFConfig
    precision: str
    scaler: torch.amp.GradScaler
    perceptual: torch.nn.Module = None
    opt: torch.optim.Optimizer = None
    ema: EMA = None
    accelerator: Accelerator = None


def step_parts(cfg, net, method_cfg, device, accelerator=None, with_optimizer=True):
    """The StepParts of `net` as configured: training.mixed_precision with its loss scaler (fp16),
    the perceptual terms, Muon + AdamW (with_optimizer=False: opt None, built later, as train.py
    does after FSDP sharding), the EMAs. train.py, auto_batch.py and the throughput benchmark build
    their steps with it."""
    t = cfg.training
    return StepParts(net=net, method_cfg=method_cfg, precision=t.mixed_precision,
                     scaler=torch.amp.GradScaler(device.type, enabled=t.mixed_precision == "fp16"),
                     perceptual=build_perceptual(cfg, method_cfg, device),
                     opt=build_optimizer(cfg, net) if with_optimizer else None,
                     ema=EMA(net, t.ema_half_lives_kimg, t.ema_rampup), accelerator=accelerator)


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor       # () mean pMF loss of the step's images
    grad_norm: torch.Tensor  # () global gradient norm before the update
    finite: bool             # loss and gradients finite on every process: the update was applied
    metrics: dict            # {name: tensor} the step's metrics, averaged over its micro-batches


def forward_backward(parts, x, y, draws, accum=1):
    """One micro-batch: the pMF loss under autocast and its (loss-scaled) backward, gradients
    accumulated. x: (B, C, H, W) in [-1, 1]; y: (B,) labels; draws: pmf.Draws of the B rows.
    Returns (loss (), metrics {name: tensor})."""
    with autocast(parts.precision, x.device):
        loss, metrics = pmf.pmf_loss(parts.net, x, y, draws, parts.method_cfg, parts.perceptual)
    parts.scaler.scale(loss / accum).backward()
    return loss.detach(), metrics


def _grad_sync(parts, last):
    """The context of a micro-batch's backward: the gradient reduction only at the step's last
    (DDP no_sync, FSDP2 set_requires_gradient_sync)."""
    if parallel.is_sharded(parts.net):
        parts.net.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last or parts.accelerator is None else parts.accelerator.no_sync(parts.net)


def train_step(parts, micro_batches, accum, step, images_per_step):
    """One optimizer step from `accum` micro-batches [(x, y, draws)]: gradients summed over them
    (DDP all-reduce at the last one only), unscaled, non-finite steps skipped on every process
    alike, Muon/AdamW update, loss-scale update, EMA update after optimizer step `step` + 1."""
    net, opt, scaler, acc = parts.net, parts.opt, parts.scaler, parts.accelerator
    loss_sum, metrics = torch.zeros((), device=next(net.parameters()).device), Window()
    for a, (x, y, draws) in enumerate(micro_batches):
        with _grad_sync(parts, a == accum - 1):
            loss, micro_metrics = forward_backward(parts, x, y, draws, accum)
        loss_sum += loss / accum
        metrics.add(micro_metrics, 1 / accum)
    scaler.unscale_(opt)
    grad_norm = parallel.full(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))
    finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    finite = _all_ok(acc, finite) if acc is not None else finite
    if finite:
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if finite:
        parts.ema.update(acc.unwrap_model(net) if acc is not None else net, step + 1, images_per_step)
        metrics.add({"grad_norm": grad_norm})
    return StepResult(loss_sum, grad_norm, finite, metrics.sums)


# ---------------------------------------------------------------- the run

def _image_shape(cfg):
    """(input_size, in_channels) of the configured model, without allocating it."""
    with torch.device("meta"):
        net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
    return net.input_size, net.in_channels


def _checkpoint_state(step, parts, counters, streak, cfg):
    """The checkpoint dict (checkpoint.py's format) on the main process, None elsewhere; every
    process must call it (the RNG states are gathered). Sharded: on every process, with the
    model, EMA and optimizer tensors as this process's DTensors (checkpoint.save_sharded)."""
    rngs = gather_object([rng_state()])
    acc, sharded = parts.accelerator, parallel.is_sharded(parts.net)
    if not (acc.is_main_process or sharded):
        return None
    emas = [dict(zip(parts.ema.names, e)) for e in parts.ema.params] if sharded else parts.ema.state_dicts()
    return {"step": step, "model": acc.unwrap_model(parts.net).state_dict(), "emas": emas,
            "ema_half_lives_kimg": list(cfg.training.ema_half_lives_kimg), "optimizer": parts.opt.state_dict(),
            "scaler": parts.scaler.state_dict(), "rng": rngs, "counters": dict(counters),
            "nonfinite_streak": streak, "config": config_lib.to_dict(cfg)}


def train(cfg, resume=None, allow_config_change=False):
    """Run (or continue) training as configured. Returns the final optimizer step."""
    stop = StopFlag()  # first, so that a preemption during start-up is not lost
    # Mixed precision is handled here, not by Accelerate (see README); cpu=True lets torchrun and
    # accelerate launch form a gloo process group on machines without CUDA.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    log, lock, batches, own_group = None, None, None, False
    try:
        # -- processes and the batch split
        device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
        t, out_dir = cfg.training, cfg.logging.out_dir
        micro, accum, batch_note = resolve_batch_split(cfg, world)
        method_cfg = config_lib.method_config(cfg)

        # -- data, checked before anything is built or written
        size, channels = _image_shape(cfg)
        with accelerator.main_process_first():
            data = data_lib.build_dataset(cfg.data, size, channels, method_cfg.num_classes)
        sampler = data_lib.StepBatches(len(data), t.global_batch_size, micro, world, rank, t.seed)

        # -- the checkpoint to resume, checked against this config
        notes = [batch_note] if batch_note else []
        resume_path, ckpt = checkpoint_lib.select_resume(resume if resume is not None else cfg.resume, out_dir,
                                                         warn=notes.append)
        if ckpt is not None:
            checkpoint_lib.check_resume_config(ckpt, cfg, resume_path, allow_config_change, warn=notes.append)

        # -- the output folder, locked for this job
        if accelerator.is_main_process:
            os.makedirs(out_dir, exist_ok=True)
        lock_ok, lock_error = True, None
        try:
            lock = OutDirLock(out_dir, accelerator.is_main_process)
        except config_lib.ConfigError as err:
            lock_ok, lock_error = False, err
        if not _all_ok(accelerator, lock_ok):
            raise lock_error or config_lib.ConfigError(f"{out_dir} is in use by another training job")

        # -- model, loss, optimizer, EMAs, and the resumed state
        torch.manual_seed(t.seed)  # identical initial weights on every process
        net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
        sharded = t.parallel != "ddp"
        own_group = sharded and parallel.ensure_process_group(device)
        if pmf.compile_wanted(t.compile, method_cfg.jvp, device) and not sharded:
            pmf.compile_model(net)  # in place, before the DDP wrap; state_dict names unchanged
        parts = step_parts(cfg, net, method_cfg, device, accelerator, with_optimizer=not sharded)
        step, counters = 0, {"skipped_steps": 0, "skipped_images": 0}
        if ckpt is None:  # a fresh run: training.init_from (fine-tuning), if set
            finetune.initial_weights(cfg, net, parts.ema, log=notes.append, opt=parts.opt)
        else:
            if checkpoint_lib.is_sharded_state(ckpt) and not sharded:
                raise checkpoint_lib.CheckpointError(
                    f"{resume_path} is a sharded checkpoint; resume it with training.parallel=fsdp or hsdp, or make "
                    f"one file of it for ddp: python checkpoint.py consolidate {resume_path}")
            if not checkpoint_lib.is_sharded_state(ckpt):
                net.load_state_dict(ckpt["model"])
                parts.ema.load_state_dicts(ckpt["emas"])
            if not sharded:
                parts.opt.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:  # empty: fp32 runs and converted JAX checkpoints (a fresh loss scale)
                parts.scaler.load_state_dict(ckpt["scaler"])
            if len(ckpt.get("rng", [])) == world:
                set_rng_state(ckpt["rng"][rank])
            step, counters = ckpt["step"], ckpt["counters"]
        if sharded:
            _shard(parts, cfg, world, device, ckpt, resume_path)
        else:
            parts.net, parts.opt = accelerator.prepare(net, parts.opt)
            parts.ema.params = [[p.to(device) for p in e] for e in parts.ema.params]

        # -- data loader from the resumed step, logger
        if accelerator.is_main_process:
            with open(os.path.join(out_dir, "config.yaml"), "w") as f:
                json.dump(config_lib.to_dict(cfg), f, indent=2)  # JSON is valid YAML
        sampler.start_step = step
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                             collate_fn=data_lib.collate, pin_memory=device.type == "cuda",
                                             worker_init_fn=_ignore_stop_signals)
        batches = iter(loader)
        total = t.max_steps or t.epochs * sampler.steps_per_epoch
        log = Logger(accelerator, out_dir, total, step, cfg.logging.tensorboard)
        log.message(f"pMF {cfg.model.name or 'custom'}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, "
                    f"{world} processes x micro {micro} x accum {accum} = {t.global_batch_size} per step, "
                    f"{len(data)} images, steps {step} -> {total}"
                    + (f", resumed from {resume_path}" if resume_path else ""))
        for note in notes:
            log.message(note)
        step = _loop(cfg, parts, batches, sampler, log, stop, step, total, accum, counters)
        return step
    finally:
        del batches  # shuts the DataLoader workers down
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()
        stop.restore()
        accelerator.end_training()
        if own_group and torch.distributed.is_initialized():  # end_training may have destroyed it
            torch.distributed.destroy_process_group()


def _shard(parts, cfg, world, device, ckpt, path):
    """fsdp/hsdp: shard the network over the mesh, its EMAs like its parameters, build the optimizer
    on the shards, and load the resumed optimizer state (a one-file checkpoint: whole tensors,
    sharded here; a sharded folder: every tensor read by `_load_sharded`)."""
    mesh = parallel.build_mesh(cfg, world, device)
    net = parallel.shard_model(parts.net.to(device), mesh, parts.precision)
    parts.ema.params = [[parallel.shard_like(e, p) for e, p in zip(ema, net.parameters())] for ema in parts.ema.params]
    parts.opt = build_optimizer(cfg, net)
    if ckpt is None:
        return
    if checkpoint_lib.is_sharded_state(ckpt):
        _load_sharded(parts, path, ckpt)
    else:
        parts.opt.load_state_dict(ckpt["optimizer"])
        parallel.shard_optimizer_state(parts.opt)


def _load_sharded(parts, path, meta):
    """Read a sharded checkpoint into the sharded network, EMAs and optimizer; the optimizer's
    per-parameter state is first made (zeros, meta's step counts) for the parameters that have one."""
    opt = parts.opt
    params = [(p, group["use_muon"]) for group in opt.param_groups for p in group["params"]]
    for index, kept in meta["optimizer"]["state"].items():
        p, muon = params[index]
        opt.state[p] = {**kept, "mu": torch.zeros_like(p), **({} if muon else {"nu": torch.zeros_like(p)})}
    model = parts.net.state_dict()
    emas = [dict(zip(parts.ema.names, e)) for e in parts.ema.params]
    checkpoint_lib.load_sharded(path, {"model": model, "emas": emas, "optimizer": opt.state_dict()})
    parts.net.load_state_dict(model)


def _loop(cfg, parts, batches, sampler, log, stop, step, total, accum, counters):
    """Optimizer steps from `step` to `total` (or a stop request); logging, samples, checkpoints."""
    t, out_dir, acc = cfg.training, cfg.logging.out_dir, parts.accelerator
    window, streak, tick, start = Window(), 0, time.perf_counter(), time.perf_counter()
    first_step, last_good, sampler_net = step, None, None
    sharded = parallel.is_sharded(parts.net)

    def micro_batches():
        for a in range(accum):
            x, y, skipped = next(batches)
            for row, where, err in skipped:
                log.message(f"skipped undecodable image {where} (dataset row {row}): {err}")
            counters["skipped_images"] += len(skipped)
            draws = pmf.step_draws(parts.method_cfg, sampler.rows(a), t.global_batch_size, x.shape[1:], t.seed, step,
                                   acc.device)
            yield x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True), draws

    while step < total:
        # -- one optimizer step
        for group in parts.opt.param_groups:
            group["lr"] = lr_at(cfg.optim, step, total)
        result = train_step(parts, micro_batches(), accum, step, t.global_batch_size)
        if result.finite:
            streak = 0
            window.add(result.metrics)
            window.end_step()
        else:
            counters["skipped_steps"] += 1
            streak += 1
            log.message(f"step {step}: non-finite loss or gradient (loss {result.loss.item():.4g}, "
                        f"grad norm {result.grad_norm.item():.4g}); step skipped")
        step += 1  # a skipped step still consumes its batch: data position == step
        log.step()
        if streak >= t.max_consecutive_nonfinite:
            good = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written by this run"
            raise TrainingStopped(f"{streak} consecutive non-finite steps at step {step}; stopping: {good} "
                                  "(try bf16 or fp32, a lower lr)")

        # -- log line, sample grid
        if step % cfg.logging.log_every == 0 or step == total:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            steps_done = max(window.steps, 1)
            record = {"step": step, "kimg": step * t.global_batch_size / 1000, **window.summary(acc),
                      "lr": parts.opt.param_groups[0]["lr"], "step_time_s": elapsed / steps_done,
                      "img_per_s": steps_done * t.global_batch_size / elapsed,
                      "peak_mem_gb": peak_memory_bytes(acc.device) / 2 ** 30, **counters}
            log.write(record)
        if step % cfg.logging.sample_every == 0 or step == total:
            ema_state = parts.ema.state_dict(cfg.sampling.ema) if acc.is_main_process or sharded else None
            if acc.is_main_process:  # sharded EMAs are gathered on every rank, drawn on the main one
                path = os.path.join(out_dir, f"samples-{step:08d}.png")
                if sampler_net is None:
                    sampler_net = sampling_network(cfg, parts.method_cfg, acc.device)
                rows = save_samples(path, sampler_net, ema_state, cfg, parts.method_cfg, acc.device)
                log.message(f"wrote {path} (grid rows are classes {rows})")

        # -- checkpoint: periodic ones only after a finite step; the last one and a stop always
        stopping = not _all_ok(acc, not stop.requested)
        if (streak == 0 and step % cfg.logging.ckpt_every == 0) or step == total or stopping:
            state = _checkpoint_state(step, parts, counters, streak, cfg)
            path = checkpoint_lib.path_for(out_dir, step, sharded)
            error = None
            if sharded:  # every process writes its shards; an error is raised on all
                checkpoint_lib.save_sharded(path, state, cfg.logging.keep_last)
            elif acc.is_main_process:
                try:
                    checkpoint_lib.save(path, state, cfg.logging.keep_last)
                except checkpoint_lib.CheckpointError as err:  # a full disk: every process stops
                    error = err
            if not _all_ok(acc, error is None):
                raise error or checkpoint_lib.CheckpointError(f"the main process could not write {path}")
            log.message(f"saved {path}" + (f" (after {streak} non-finite steps)" if streak else ""))
            last_good = path if streak == 0 else last_good
        if stopping:
            log.message(f"stop requested: checkpoint written at step {step}; resume with --resume auto")
            break

    # -- summary
    elapsed = time.perf_counter() - start
    log.message(f"done: steps {first_step} -> {step} in {_clock(elapsed)} "
                f"({(step - first_step) * t.global_batch_size / max(elapsed, 1e-9):.0f} img/s); checkpoints "
                f"{os.path.join(out_dir, 'ckpt-*.dcp' if sharded else 'ckpt-*.pt')}, "
                f"samples {os.path.join(out_dir, 'samples-*.png')}, "
                f"metrics {os.path.join(out_dir, 'metrics.jsonl')} (python plot.py {out_dir})")
    run_config = os.path.join(out_dir, "config.yaml")
    if last_good and sharded:
        log.message(f"evaluate: python checkpoint.py consolidate {last_good}, then python eval.py --ckpt "
                    f"{last_good[:-len('.dcp')]}.pt --ref-from-config {run_config}")
    elif last_good:
        log.message(f"evaluate: python eval.py --ckpt {last_good} --ref-from-config {run_config}")
    return step


def main(argv=None):
    """CLI entry. Bad input (config, data, a file path, the launch) ends as one line on stderr,
    `<kind> error: <what and the fix>`, with exit status 1; other errors keep their traceback."""
    args = parse_args(argv)
    world_vars = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if os.environ.get("ACCELERATE_USE_CPU") == "True" and "MASTER_ADDR" in os.environ and not any(
            v in os.environ for v in world_vars):  # what `accelerate launch --cpu --num_processes N` leaves
        sys.exit("launch error: accelerate launch --cpu starts one process whatever --num_processes says (MASTER_ADDR "
                 "is set, WORLD_SIZE is not); for N CPU processes run accelerate launch --multi_gpu --num_processes "
                 "N train.py or torchrun --nproc_per_node=N train.py")
    one_line = lambda err: " ".join(str(err).splitlines())  # noqa: E731 (embedded library messages)
    try:
        train(config_lib.load_config(args.config, args.overrides), args.resume, args.allow_config_change)
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {one_line(err)}")
    except data_lib.DataError as err:
        sys.exit(f"data error: {one_line(err)}")
    except checkpoint_lib.CheckpointError as err:
        sys.exit(f"checkpoint error: {one_line(err)}")
    except TrainingStopped as err:
        sys.exit(f"training stopped: {one_line(err)}")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        sys.exit(f"error: {err.strerror}: {err.filename!r}" if err.filename else f"error: {one_line(err)}")

if __name__ == "__main__":
    parallel.run_main(main)
