"""Training throughput: the step train.py runs, per precision and compile setting, beside the data
loader's own rate, side by side in one run, as one markdown table.

    python benchmarks/throughput.py --batch 32                                # pMF-B/16 (config.yaml)
    python benchmarks/throughput.py --tiny --batch 8 --compile off,on         # a tiny shape, seconds on CPU
    python benchmarks/throughput.py --batch 32 --precision bf16,fp16 --parquet data --workers 8 model.name=pMF-L/16
    python benchmarks/throughput.py --config quickstart.yaml --batch 64,128 --rows "model.head_depth=2;"   # shapes

Step rows: each --rows entry (overrides of its own, ";"-separated; an empty entry adds none) x each
--batch x each --precision x each --compile, in that order.

Each step row runs `train.train_step` (the function train.py and auto_batch.py call: pMF loss
under autocast, backward, loss scaling, Muon + AdamW, EMA update) in a fresh child process: the
network built as configured (compiled with pmf.compile_model for `--compile on`), fresh draws per
step as in training, one micro-batch of fixed images. `--warmup` steps (compiles and recompiles,
optimizer state), then `--steps` timed steps: s/step = their wall time / steps, img/s = batch /
s/step. Peak memory is train.peak_memory_bytes of the child after all its steps (CUDA: max
allocated; CPU: the process's peak RSS, model and baseline included). Model TFLOP/s counts the
network's matmul FLOPs of the timed steps' draws (benchmarks/jvp_step.py `flops_per_sample`,
"pmf" row), not the optimizer's or the perceptual networks'.

The loader row reads Parquet shards (--parquet, HF ImageNet layout; default: a temporary folder of
--loader-images synthetic 500 x 375 JPEGs, ImageNet's typical size) through dataset.build_dataset
and train.py's DataLoader set-up (StepBatches, --workers workers, collate), decoding and cropping
to the model's image size: img/s over --loader-batches batches after the first. Without the
`datasets` package the row says so and the step rows still run.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config as config_lib  # noqa: E402

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # name -> training.mixed_precision
TINY = ["model.input_size=16", "model.in_channels=3", "model.num_classes=10", "model.depth=3",
        "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4", "model.head_depth=2",
        "perceptual.lpips=false", "perceptual.convnext=false"]


def _overrides(args, precision=None, compiled=None, row=()):
    """The config overrides of a row: --tiny's shape, the command line's, then the row's own (its
    --rows entry, precision and compile)."""
    extra = [f"training.mixed_precision={PRECISIONS[precision]}"] if precision else []
    extra += [f"training.compile={'true' if compiled == 'on' else 'false'}"] if compiled else []
    return (TINY if args.tiny else []) + list(args.overrides) + list(row) + extra


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- a step row (child process)

def time_steps(cfg, batch, warmup, steps, device, random_perceptual=False, backend="inductor"):
    """`warmup` + `steps` train.train_step calls at micro-batch `batch`, one process.

    random_perceptual: the configured perceptual terms with randomly initialised networks (same
    cost, no weight files); backend: pmf.compile_model's, when training.compile is on.
    Returns {"s_per_step": timed wall seconds / steps, "peak_bytes": train.peak_memory_bytes,
    "flops_per_step": network matmul FLOPs of one timed step, mean over the timed draws}."""
    import dataset as data_lib
    import model as model_lib
    import perceptual as perceptual_lib
    import pmf
    import train
    from jvp_step import flops_per_sample
    method = config_lib.method_config(cfg)
    torch.manual_seed(0)
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg)).to(device)
    if pmf.compile_wanted(cfg.training.compile, method.jvp, device):
        pmf.compile_model(net, backend=backend)
    p = cfg.perceptual
    use_lpips, use_convnext = p.lpips and method.lpips_weight > 0, p.convnext and method.convnext_weight > 0
    if random_perceptual:  # the configured terms with randomly initialised networks: same cost, no weight files
        p.lpips = p.convnext = False
    parts = train.step_parts(cfg, net, method, device)
    if random_perceptual and (use_lpips or use_convnext):
        parts.perceptual = perceptual_lib.PerceptualLoss(
            perceptual_lib.build_lpips(pretrained=False) if use_lpips else None,
            perceptual_lib.build_convnext(pretrained=False) if use_convnext else None).to(device)
    data = data_lib.DummyImages(net.input_size, net.in_channels, method.num_classes, batch)
    x = torch.stack([data.load(i)[0] for i in range(batch)]).to(device)
    y = torch.tensor([data.load(i)[1] for i in range(batch)], device=device)
    timed = []
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        draws = pmf.step_draws(method, range(batch), batch, x.shape[1:], 0, step, device)
        train.train_step(parts, [(x, y, draws)], 1, step, batch)
        timed += [draws] if step >= warmup else []
    _synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    flops = np.mean([flops_per_sample(net, method, d)["pmf"] * batch for d in timed])
    return {"s_per_step": seconds, "peak_bytes": train.peak_memory_bytes(device), "flops_per_step": float(flops)}


# ---------------------------------------------------------------- the loader row

def synthetic_parquet(folder, n, seed=0):
    """One HF-layout shard `train-00000-of-00001.parquet` of n smooth random 500 x 375 RGB JPEGs
    (quality 90; labels i mod 10) in `folder`; returns folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((500, 375), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        rows.append({"image": {"bytes": buf.getvalue(), "path": f"{i}.JPEG"}, "label": i % 10})
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "train-00000-of-00001.parquet"))
    return folder


def loader_rate(cfg, batch, workers, batches, parquet, device):
    """img/s of train.py's DataLoader over Parquet shards in `parquet` (split train): dataset.py's
    decode and crop to the model's size, StepBatches, `workers` workers; `batches` batches timed
    after the first (worker start-up)."""
    import dataset as data_lib
    import train
    size, channels = train._image_shape(cfg)
    cfg.data.source, cfg.data.path, cfg.data.split = "parquet", parquet, "train"
    data = data_lib.build_dataset(cfg.data, size, channels, config_lib.method_config(cfg).num_classes)
    sampler = data_lib.StepBatches(len(data), batch, batch, 1, 0, cfg.training.seed)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers, collate_fn=data_lib.collate,
                                         pin_memory=device.type == "cuda", worker_init_fn=train._ignore_stop_signals)
    batches_iter = iter(loader)
    next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    return batches * batch / (time.perf_counter() - start)


def loader_row(args, cfg, device):
    """(label, img/s or None, note) of the loader row; a missing package or bad folder is a note."""
    label = f"data loader: parquet, {args.workers} workers"
    try:
        import datasets  # dataset.ParquetImages reads the shards with it
        import pyarrow  # noqa: F401 (the synthetic shard)
    except ImportError as err:
        return label, None, f"skipped: {err.name} is not installed"
    datasets.disable_progress_bars()
    if args.parquet:
        return label, loader_rate(cfg, args.batch, args.workers, args.loader_batches, args.parquet, device), args.parquet
    with tempfile.TemporaryDirectory() as folder:
        n = max(args.loader_images, args.batch)
        synthetic_parquet(folder, n)
        rate = loader_rate(cfg, args.batch, args.workers, args.loader_batches, folder, device)
    return label, rate, f"{n} synthetic 500 x 375 JPEGs"


# ---------------------------------------------------------------- the run (parent process)

def run_row(args, precision, compiled, batch=None, row=()):
    """One step row in a fresh child process: its time_steps dict, or {"error": one line}.
    batch: the micro-batch (default args.batch); row: its extra overrides (a --rows entry)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", precision, compiled, "--config", args.config,
           "--batch", str(batch or args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--device", args.device, "--backend", args.backend, *(["--tiny"] if args.tiny else []),
           *(["--random-perceptual"] if args.random_perceptual else []), *args.overrides, *row]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.row_timeout:g} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {last[:200]}"}
    return json.loads(lines[-1])


def table(rows, loader, loader_batch):
    """Markdown lines: one row per (--rows entry, batch, precision, compile) step row, then the
    loader row. The speed-up is in img/s against the first step row."""
    lines = ["| what | batch | precision | compile | s/step | img/s | speed-up vs first row | peak memory GB | "
             "model TFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    first = next((batch / r["s_per_step"] for _, batch, _, _, r in rows if "error" not in r), None)
    for row, batch, precision, compiled, r in rows:
        what = " ".join(["train_step", *row])
        if "error" in r:
            lines.append(f"| {what} | {batch} | {precision} | {compiled} | {r['error']} | | | | |")
            continue
        lines.append(f"| {what} | {batch} | {precision} | {compiled} | {r['s_per_step']:.4g} | "
                     f"{batch / r['s_per_step']:.4g} | {batch / r['s_per_step'] / first:.2f} | "
                     f"{r['peak_bytes'] / 2 ** 30:.2f} | {r['flops_per_step'] / r['s_per_step'] / 1e12:.3g} |")
    if loader is not None:  # its s/step column is seconds per batch
        label, rate, note = loader
        speed = f"{loader_batch / rate:.4g} | {rate:.4g}" if rate else f"{note} |"
        lines.append(f"| {label} ({note}) | {loader_batch} | | | {speed} | | | |" if rate else
                     f"| {label} | {loader_batch} | | | {speed} | | | |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml", help="model shape, method recipe, optimizer, perceptual terms")
    p.add_argument("--tiny", action="store_true", help="a tiny shape (16 px, depth 3, width 32), perceptual terms off")
    p.add_argument("--batch", default="4", help="comma-separated micro-batches of the step rows (the first: the "
                                                 "loader's batch)")
    p.add_argument("--rows", default="", help="';'-separated sets of overrides, one set of step rows each, e.g. "
                                              "'model.depth=6;model.depth=8' (default: one set, no extra overrides)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--compile", default="off", help="comma-separated: off, on (pmf.compile_model)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles, optimizer state)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random-perceptual", action="store_true",
                   help="the configured perceptual terms with randomly initialised networks (no weight files)")
    p.add_argument("--row-timeout", type=float, default=None, help="seconds a step row may take (default: no limit)")
    p.add_argument("--parquet", default=None, help="folder of train-*.parquet shards (default: a synthetic one)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the loader row")
    p.add_argument("--loader-batches", type=int, default=10, help="timed loader batches")
    p.add_argument("--loader-images", type=int, default=256, help="images of the synthetic Parquet shard")
    p.add_argument("--no-loader", action="store_true", help="leave the loader row out")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--child", nargs=2, metavar=("PRECISION", "COMPILE"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.name=pMF-L/16")
    args = p.parse_args(argv)
    args.precision, args.compile = args.precision.split(","), args.compile.split(",")
    bad = [v for v in args.precision if v not in PRECISIONS] + [v for v in args.compile if v not in ("off", "on")]
    if bad:
        p.error(f"{bad[0]!r}: --precision takes fp32, bf16, fp16 and --compile off, on")
    try:
        args.batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        p.error(f"--batch {args.batch!r}: give comma-separated integers, e.g. 64,128")
    args.batch, args.rows = args.batches[0], [entry.split() for entry in args.rows.split(";")]
    if min(*args.batches, args.steps, args.loader_batches) < 1 or min(args.warmup, args.workers) < 0:
        p.error("--batch, --steps and --loader-batches must be >= 1, --warmup and --workers >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        if args.child:
            cfg = config_lib.load_config(args.config, _overrides(args, *args.child))
            print(json.dumps(time_steps(cfg, args.batch, args.warmup, args.steps, device, args.random_perceptual,
                                        args.backend)))
            return
        cfg = config_lib.load_config(args.config, _overrides(args))
        settings = [(row, batch, precision, compiled) for row in args.rows for batch in args.batches
                    for precision in args.precision for compiled in args.compile]
        for row, _, precision, compiled in settings:  # every row's config is checked before any row runs
            config_lib.load_config(args.config, _overrides(args, precision, compiled, row))
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    import model as model_lib
    import train
    size, channels = train._image_shape(cfg)
    with torch.device("meta"):
        params = sum(p.numel() for p in model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
                     .parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
    header = (f"{cfg.model.name} recipe, {params / 1e6:.1f}M parameters, {size} px x {channels} channels; "
              f"{args.device} ({where}), torch {torch.__version__}; warm-up {args.warmup} + timed {args.steps} steps per row, each row in a fresh "
              f"process; {args.config} {' '.join(_overrides(args))}")
    print(header, flush=True)
    rows = []
    for row, batch, precision, compiled in settings:
        rows.append((row, batch, precision, compiled, run_row(args, precision, compiled, batch, row)))
        print(f"  {' '.join(row)} batch {batch} {precision} compile {compiled}: {rows[-1][-1]}", flush=True)
    loader = None if args.no_loader else loader_row(args, cfg, device)
    lines = [header, "", *table(rows, loader, args.batch)]
    print("\n".join(lines[2:]))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
