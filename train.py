"""Train pMF. One process per GPU (or one CPU process):

    accelerate launch train.py [--config config.yaml] [section.key=value ...]
    torchrun --nproc_per_node=8 train.py [--config config.yaml] [section.key=value ...]
    python train.py --config quickstart.yaml          # tiny pMF on MNIST, CPU

The loop wires config -> model, pMF loss, Muon -> files. Each optimizer step consumes one global
batch (micro x processes x accumulation) whose rows, random draws and noise depend only on
(seed, step, row): any process/accumulation split trains the same, and resuming at step k
continues the exact run (reference §10.4 for the JVP/DDP design, §6 for the EMAs).
"""
import argparse
import contextlib
import glob
import json
import math
import os
import resource
import signal
import sys
import time

import torch
import torchvision
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

import config as config_lib
import dataset as data_lib
import model as model_lib
import optimizer as optim_lib
import perceptual as perceptual_lib
import pmf

CKPT_PATTERN = "ckpt-*.pt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train pixel MeanFlow (pMF).")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the latest in out_dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.global_batch_size=256")
    return parser.parse_args(argv)


class EMA:
    """EDM half-life EMAs (reference §6): after optimizer step k with B images per step,
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
        """EMA `index` as {name: tensor}, loadable with model.load_weights."""
        return {n: p.cpu() for n, p in zip(self.names, self.params[index])}

    def state_dicts(self):
        return [self.state_dict(i) for i in range(len(self.params))]

    def load_state_dicts(self, dicts):
        for ema, saved in zip(self.params, dicts):
            for p, name in zip(ema, self.names):
                p.copy_(saved[name])


def resolve_accumulation(cfg, world):
    """Gradient-accumulation steps such that micro x world x accum = global batch."""
    t = cfg.training
    accum = t.grad_accum_steps or t.global_batch_size // (t.micro_batch_size * world)
    if t.micro_batch_size * world * accum != t.global_batch_size:
        raise config_lib.ConfigError(
            f"training.micro_batch_size {t.micro_batch_size} x {world} processes x grad_accum_steps {accum} "
            f"!= training.global_batch_size {t.global_batch_size}; change micro_batch_size or grad_accum_steps")
    return accum


def checkpoint_paths(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, CKPT_PATTERN)))


def find_resume(cfg, cli_resume):
    choice = cli_resume if cli_resume is not None else cfg.resume
    if not choice:
        return None
    if choice == "auto":
        paths = checkpoint_paths(cfg.logging.out_dir)
        return paths[-1] if paths else None
    if not os.path.isfile(choice):
        raise FileNotFoundError(f"resume checkpoint {choice!r} not found")
    return choice


def save_checkpoint(path, keep_last, state):
    """Write atomically (a crash mid-write leaves the previous files intact), keep the last K."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in checkpoint_paths(os.path.dirname(path))[:-keep_last]:
        os.remove(old)


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class StopFlag:
    """Set by SIGTERM/SIGINT (a preempted job); checked collectively at each step boundary."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Logger:
    """Main process: tqdm bar, stdout lines, metrics.jsonl, TensorBoard when installed and enabled."""

    def __init__(self, accelerator, out_dir, total, start, tensorboard):
        self.main = accelerator.is_main_process
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

    def write(self, record):
        if not self.main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
        shown = {k: record[k] for k in ("loss", "mse_u", "mse_v", "grad_norm", "img_per_s") if k in record}
        self.bar.write(f"step {record['step']}: " + " ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def message(self, text):
        if self.main:
            self.bar.write(text)

    def close(self):
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


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


@torch.no_grad()
def save_samples(path, ema_state, cfg, method_cfg, device):
    """One-step samples of an EMA with fixed noise and labels (row i of the grid: class i mod K)."""
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg), with_v_head=False)
    model_lib.load_weights(net, ema_state, source="EMA")
    net.to(device).eval()
    n = cfg.logging.sample_grid
    gen = torch.Generator().manual_seed(cfg.training.seed)
    noise = torch.randn(n, net.in_channels, net.input_size, net.input_size, generator=gen)
    nrow = math.ceil(math.sqrt(n))
    labels = (torch.arange(n) // nrow) % method_cfg.num_classes
    s = cfg.sampling
    x = pmf.sample(net, noise.to(device), labels.to(device), s.omega, s.t_min, s.t_max, method_cfg, steps=s.steps)
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


def train(cfg, resume=None):
    """Run (or continue) training as configured. Returns the final optimizer step."""
    # Mixed precision is handled here, not by Accelerate (see README); cpu=True lets torchrun and
    # accelerate launch form a gloo process group on machines without CUDA.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    t = cfg.training
    accum = resolve_accumulation(cfg, world)
    method_cfg = config_lib.method_config(cfg)
    resume_path = find_resume(cfg, resume)
    os.makedirs(cfg.logging.out_dir, exist_ok=True)

    torch.manual_seed(t.seed)  # identical initial weights on every process
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
    with accelerator.main_process_first():
        data = data_lib.build_dataset(cfg.data, net.input_size, net.in_channels, method_cfg.num_classes)
    perceptual = build_perceptual(cfg, method_cfg, device)
    opt = build_optimizer(cfg, net)
    ema = EMA(net, t.ema_half_lives_kimg, t.ema_rampup)
    fp16 = t.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    autocast = dict(device_type=device.type, dtype=torch.float16 if fp16 else torch.bfloat16,
                    enabled=t.mixed_precision != "no")

    step, counters = 0, {"skipped_steps": 0, "skipped_images": 0}
    if resume_path is not None:
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dicts(ckpt["emas"])
        scaler.load_state_dict(ckpt["scaler"])
        step, counters = ckpt["step"], ckpt["counters"]
    net, opt = accelerator.prepare(net, opt)
    ema.params = [[p.to(device) for p in e] for e in ema.params]

    if accelerator.is_main_process:
        with open(os.path.join(cfg.logging.out_dir, "config.yaml"), "w") as f:
            json.dump(config_lib.to_dict(cfg), f, indent=2)  # JSON is valid YAML
    sampler = data_lib.StepBatches(len(data), t.global_batch_size, t.micro_batch_size, world, rank, t.seed, step)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         collate_fn=data_lib.collate, pin_memory=device.type == "cuda")
    batches = iter(loader)
    total = t.max_steps or t.epochs * sampler.steps_per_epoch
    log = Logger(accelerator, cfg.logging.out_dir, total, step, cfg.logging.tensorboard)
    log.message(f"pMF {cfg.model.name}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, {world} "
                f"processes x micro {t.micro_batch_size} x accum {accum} = {t.global_batch_size} per step, "
                f"{len(data)} images, steps {step} -> {total}" + (f", resumed from {resume_path}" if resume_path else ""))
    stop, window, consecutive_bad = StopFlag(), Window(), 0
    tick = time.perf_counter()

    def checkpoint():
        rngs = gather_object([rng_state()])
        if accelerator.is_main_process:
            state = {"step": step, "model": accelerator.unwrap_model(net).state_dict(), "emas": ema.state_dicts(),
                     "ema_half_lives_kimg": list(t.ema_half_lives_kimg), "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rngs, "counters": dict(counters),
                     "data": {"seed": t.seed, "step": step, "epoch": step // sampler.steps_per_epoch},
                     "config": config_lib.to_dict(cfg)}
            save_checkpoint(os.path.join(cfg.logging.out_dir, f"ckpt-{step:08d}.pt"), cfg.logging.keep_last, state)
        accelerator.wait_for_everyone()

    while step < total:
        loss_sum, step_metrics = torch.zeros((), device=device), Window()
        for a in range(accum):
            x, y, skipped = next(batches)
            for row, where, err in skipped:
                log.message(f"skipped undecodable image {where} (dataset row {row}): {err}")
            counters["skipped_images"] += len(skipped)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            draws = pmf.step_draws(method_cfg, sampler.rows(a), t.global_batch_size, x.shape[1:], t.seed, step,
                                   device)
            sync = contextlib.nullcontext() if a == accum - 1 else accelerator.no_sync(net)
            with sync:
                with torch.autocast(**autocast):
                    loss, metrics = pmf.pmf_loss(net, x, y, draws, method_cfg, perceptual)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
            step_metrics.add(metrics, 1 / accum)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        finite = bool(accelerator.reduce(finite.float(), "sum").item() == world)
        if finite:
            scaler.step(opt)
            consecutive_bad = 0
        else:
            counters["skipped_steps"] += 1
            consecutive_bad += 1
            log.message(f"step {step}: non-finite loss or gradient (loss {loss_sum.item():.4g}, "
                        f"grad norm {grad_norm.item():.4g}); step skipped")
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if finite:
            ema.update(accelerator.unwrap_model(net), step + 1, t.global_batch_size)
            window.add({**step_metrics.sums, "grad_norm": grad_norm})
            window.end_step()
        step += 1  # a skipped step still consumes its batch: data position == step
        log.step()
        if consecutive_bad >= t.max_consecutive_nonfinite:
            log.close()
            stop.restore()
            accelerator.end_training()
            raise RuntimeError(f"{consecutive_bad} consecutive non-finite steps at step {step}; stopping with the "
                               f"last good checkpoint in {cfg.logging.out_dir} (try bf16 or fp32, a lower lr)")

        if step % cfg.logging.log_every == 0 or step == total:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            steps_done = max(window.steps, 1)
            record = {"step": step, "kimg": step * t.global_batch_size / 1000, **window.summary(accelerator),
                      "lr": opt.param_groups[0]["lr"], "step_time_s": elapsed / steps_done,
                      "img_per_s": steps_done * t.global_batch_size / elapsed,
                      "peak_mem_gb": peak_memory_gb(device), **counters}
            log.write(record)
        if step % cfg.logging.sample_every == 0 or step == total:
            if accelerator.is_main_process:
                path = os.path.join(cfg.logging.out_dir, f"samples-{step:08d}.png")
                rows = save_samples(path, ema.state_dict(cfg.sampling.ema), cfg, method_cfg, device)
                log.message(f"wrote {path} (grid rows are classes {rows})")
        stopping = bool(accelerator.reduce(torch.tensor(float(stop.requested), device=device), "sum").item())
        if step % cfg.logging.ckpt_every == 0 or step == total or stopping:
            checkpoint()
        if stopping:
            log.message(f"stop requested: checkpoint written at step {step}; resume with --resume auto")
            break
    log.close()
    stop.restore()
    accelerator.end_training()
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
        train(config_lib.load_config(args.config, args.overrides), args.resume)
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {one_line(err)}")
    except data_lib.DataError as err:
        sys.exit(f"data error: {one_line(err)}")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        sys.exit(f"error: {err.strerror}: {err.filename!r}" if err.filename else f"error: {one_line(err)}")

if __name__ == "__main__":
    main()
