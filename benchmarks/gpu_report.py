"""One-GPU report: for pMF-B/16, L/16 and H/16 the largest bf16 micro-batch (auto_batch.py's
search), then the training step's throughput at that batch in bf16 and fp16, compile off and on
(benchmarks/throughput.py's rows), and the Parquet loader's rate, as one markdown table, within a
wall-time budget. Run it through benchmarks/gpu_report.sh:

    bash benchmarks/gpu_report.sh                  # one CUDA GPU: gpu_report.md and stdout, < 8 min
    bash benchmarks/gpu_report.sh --tiny           # CPU: the same code on a tiny shape, seconds (CI)

Perceptual terms are off in every trial and row (their pretrained weights are not assumed present);
the step is otherwise train.py's (throughput.py's docstring). Time: each search stops starting
trials after --search-s seconds (its batch is then a lower bound, marked "capped"); then every
model's eager rows run, then the loader row, then the compiled rows; a row that would start after
the budget is spent, or runs past it, is marked in the table instead of measured. --tiny runs its
rows in this process (its peak memory column is then this process's running peak; the budget
decides only whether a row starts), and its one search trial in a child as auto_batch does.
"""
import argparse
import os
import sys
import time
import types

import torch

import throughput  # benchmarks/ is this script's folder; throughput puts the repository on the path
import auto_batch  # noqa: E402 (after throughput's path set-up)
import config as config_lib  # noqa: E402

MODELS = ("pMF-B/16", "pMF-L/16", "pMF-H/16")
NO_PERCEPTUAL = ["perceptual.lpips=false", "perceptual.convnext=false"]


def largest_batch(model_overrides, args, deadline):
    """(micro-batch, note): auto_batch's search in bf16 at this model, trials started only before
    `deadline` (later ones count as not fitting), rounded as auto_batch writes it."""
    overrides = model_overrides + NO_PERCEPTUAL + ["training.mixed_precision=bf16"]
    trial_args = types.SimpleNamespace(steps=2, device=args.device, config=args.config, overrides=overrides)
    capped = []

    def measure(batch):
        if time.monotonic() > deadline:
            capped.append(batch)
            return False, None, None
        return auto_batch.measure(batch, trial_args, budget)

    budget = int(memory_budget(args) * (1 - args.margin))
    best, rows = auto_batch.search(measure, budget, args.max_batch, start=args.start_batch)
    micro, _ = auto_batch.choose_micro(best, args.max_batch, 1)
    tried = ", ".join(f"{b}{'' if fits else ' no'}" for b, fits, peak, _ in rows if peak is not None or fits)
    return micro, f"largest fitting {best}; trials {tried}{'; capped' if capped else ''}"


def memory_budget(args):
    """Bytes a trial may use: the GPU's total memory, or --cpu-memory on CPU."""
    if args.device == "cpu":
        return auto_batch.parse_bytes(args.cpu_memory)
    return torch.cuda.get_device_properties(torch.device(args.device)).total_memory


def step_row(args, model_overrides, batch, precision, compiled, deadline):
    """throughput.run_row's result for one row, or a note when the budget is spent."""
    left = deadline - time.monotonic()
    if left < 5:
        return {"error": "not run: time budget spent"}
    row_args = types.SimpleNamespace(config=args.config, batch=batch, warmup=args.warmup, steps=args.steps,
                                     device=args.device, backend=args.backend, tiny=False, random_perceptual=False,
                                     row_timeout=left, overrides=model_overrides + NO_PERCEPTUAL)
    if not args.tiny:
        return throughput.run_row(row_args, precision, compiled)
    cfg = config_lib.load_config(args.config, throughput._overrides(row_args, precision, compiled))
    try:  # --tiny: in this process (a child's start-up costs more than the row); peak memory is the running peak
        return throughput.time_steps(cfg, batch, args.warmup, args.steps, torch.device(args.device),
                                     backend=args.backend)
    except Exception as err:  # a failing row is a table entry, as a failed child is
        return {"error": f"failed: {type(err).__name__}: {' '.join(str(err).splitlines())[:200]}"}


def table(results, loader):
    """Markdown lines: one row per (model, precision, compile), then the loader row."""
    lines = ["| model | micro-batch (bf16 search) | precision | compile | s/step | img/s | peak memory GB | "
             "model TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for model, batch, note, precision, compiled, r in results:
        cells = (f"{r['error']} | | | " if "error" in r else
                 f"{r['s_per_step']:.4g} | {batch / r['s_per_step']:.4g} | {r['peak_bytes'] / 2 ** 30:.2f} | "
                 f"{r['flops_per_step'] / r['s_per_step'] / 1e12:.3g} ")
        lines.append(f"| {model} | {batch} ({note}) | {precision} | {compiled} | {cells}|")
    if loader is not None:  # (label, img/s or None, note, batch)
        label, rate, note, batch = loader
        lines.append(f"| {label} ({note}) | {batch} | | | | {rate:.4g} | | |" if rate else
                     f"| {label} | {batch} | | | {note} | | | |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, the tiny shape of throughput.py --tiny, small budget")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--out", default="gpu_report.md", help="markdown file written besides stdout")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default 450; --tiny 50)")
    p.add_argument("--search-s", type=float, default=None, help="search time per model (default 45; --tiny 15)")
    p.add_argument("--margin", type=float, default=0.1, help="auto_batch's memory margin")
    p.add_argument("--cpu-memory", default="8GB", help="--tiny: the peak RSS a trial may use")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: CPU cores, at most 8)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    args.budget_s = args.budget_s or (50 if args.tiny else 450)
    args.search_s = args.search_s or (15 if args.tiny else 45)
    args.start_batch, args.max_batch = (2, 2) if args.tiny else (32, 1024)  # tiny: one trial
    args.backend = "aot_eager" if args.tiny else "inductor"  # CPU inductor compiles take minutes
    args.steps = 2 if args.tiny else args.steps
    args.workers = args.workers if args.workers is not None else (1 if args.tiny else min(8, os.cpu_count() or 1))
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_report: no CUDA device is visible; run with --tiny for the CPU path")
    models = {"tiny": throughput.TINY} if args.tiny else {m: [f"model.name={m}"] for m in MODELS}
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    header = (f"gpu_report: {device_name}, torch {torch.__version__}; perceptual terms off; warm-up {args.warmup} + "
              f"{args.steps} timed steps per row; compile backend {args.backend}; budget {args.budget_s:g} s")
    print(header, flush=True)
    batches = {}
    for model, overrides in models.items():
        try:
            batches[model] = largest_batch(overrides, args, min(deadline, time.monotonic() + args.search_s))
        except (auto_batch.AutoBatchError, config_lib.ConfigError) as err:
            batches[model] = (None, " ".join(str(err).splitlines())[:200])
        print(f"  {model}: micro-batch {batches[model][0]} ({batches[model][1]})", flush=True)
    results = []
    for compiled in ("off", "on"):
        for model, overrides in models.items():
            batch, note = batches[model]
            for precision in ("bf16", "fp16"):
                r = (step_row(args, overrides, batch, precision, compiled, deadline) if batch
                     else {"error": "no micro-batch"})
                results.append((model, batch, note, precision, compiled, r))
                print(f"  {model} {precision} compile {compiled}: {r}", flush=True)
        if compiled == "off":
            loader = loader_for(args, models, batches)
    lines = table(results, loader)
    print("\n".join(lines))
    print(f"gpu_report: {time.monotonic() - start:.0f} s; table in {args.out}")
    with open(args.out, "w") as f:
        f.write("\n".join([header, ""] + lines) + "\n")


def loader_for(args, models, batches):
    """throughput.loader_row at the first model's size and micro-batch, + that batch; None if none."""
    model, overrides = next(iter(models.items()))
    batch = batches[model][0]
    if not batch:
        return None
    loader_args = types.SimpleNamespace(workers=args.workers, parquet=None, batch=batch, loader_batches=3 if args.tiny
                                        else 10, loader_images=max(2 * batch, 32 if args.tiny else 256))
    cfg = config_lib.load_config(args.config, overrides + NO_PERCEPTUAL)
    return (*throughput.loader_row(loader_args, cfg, torch.device(args.device)), batch)


if __name__ == "__main__":
    main()
