"""Plot a training run's metrics.jsonl as one PNG of the curves that say whether it trains.

    python plot.py runs/quickstart                 # writes runs/quickstart/metrics.png
    python plot.py runs/quickstart --out curves.png

Panels: the raw u- and v-MSE (they fall while the adaptive loss sits near 1 per term), the u-MSE
per t bucket, ||du/dt||, the gradient norm, and throughput. Keys are documented in the README
("What the log says").
"""
import argparse
import json
import os
import sys

PANELS = [  # (title, keys or a key prefix ending in "*", log scale)
    ("raw MSE of u and v (per pixel)", ["mse_u", "mse_v"], True),
    ("raw u-MSE by t bucket", ["mse_u_t*"], True),
    ("adaptive loss terms", ["loss_u", "loss_v", "loss_lpips", "loss_convnext"], False),
    ("||du/dt|| (r < t rows)", ["du_dt_norm"], False),
    ("gradient norm", ["grad_norm"], True),
    ("images per second", ["img_per_s"], False),
]


class PlotError(RuntimeError):
    """A run folder without readable metrics; the message says which file."""


def read_metrics(run_dir):
    """The records of run_dir/metrics.jsonl (a list of dicts); a torn last line is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path} not found; pass the logging.out_dir of a training run")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    if not records:
        raise PlotError(f"{path} has no records yet; wait for the first log line (logging.log_every)")
    return records


def _series(records, key):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _keys(records, pattern):
    if not pattern.endswith("*"):
        return [pattern]
    return sorted({k for r in records for k in r if k.startswith(pattern[:-1])})


def plot(records, out_path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, patterns, log_scale) in zip(axes.flat, PANELS):
        drawn = False
        for key in (k for p in patterns for k in _keys(records, p)):
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, label=key)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        if drawn:
            ax.legend(fontsize=8)
            if log_scale and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot a run's metrics.jsonl to a PNG.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", help="the run's logging.out_dir")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.run_dir)
    except PlotError as err:
        sys.exit(f"error: {err}")
    out = args.out or os.path.join(args.run_dir, "metrics.png")
    plot(records, out, title=f"{args.run_dir}: {len(records)} log lines, step {records[-1]['step']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
