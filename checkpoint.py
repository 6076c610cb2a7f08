"""Training checkpoints: the one module that names, writes, finds, checks and reads them.

A checkpoint `out_dir/ckpt-{step:08d}.pt` is a `torch.save` dict that loads with weights_only=True:

    format            FORMAT_VERSION (files without it are version 0: the same keys)
    step              optimizer steps done; with the seed it fixes the data position and every draw
    model             the network's state_dict (trunk, u-head and v-head)
    emas              one state_dict per EMA, in the order of ema_half_lives_kimg
    ema_half_lives_kimg
    optimizer         MuonAdamW.state_dict() (the full Muon momentum on every rank)
    scaler            GradScaler.state_dict() (fp16 loss scale)
    rng               every rank's torch RNG state, restored on resume when the world size matches
    counters          skipped_steps, skipped_images
    nonfinite_streak  non-finite steps in a row just before the write (0: the weights are good)
    config            the resolved config as plain data (config.to_dict)

Writes are atomic (a temporary file, fsync'd, renamed, then the directory fsync'd), so a crash or
a full disk never leaves a half-written `ckpt-*.pt`.
"""
import errno
import glob
import os
import re

import torch

import config as config_lib

FORMAT_VERSION = 1
PATTERN = "ckpt-*.pt"
TRAINING_KEYS = ("step", "model", "emas", "optimizer", "scaler", "counters", "config")

# Config keys that may differ between a checkpoint and the run that resumes it: they change
# logging, paths, the stopping point or memory use, not the optimisation trajectory. Prefixes end
# with a dot. Micro-batch and accumulation: every (processes, accumulation) split of the global
# batch trains the same model to float rounding (see README "Launching").
RESUME_FREE_KEYS = ("logging.", "resume", "sampling.", "training.max_steps", "training.epochs",
                    "training.micro_batch_size", "training.grad_accum_steps", "training.max_consecutive_nonfinite",
                    "training.compile", "training.init_from", "training.init_ema", "training.init_optimizer",
                    "training.init_v_head",
                    "data.num_workers", "data.path", "perceptual.vgg16_path",
                    "perceptual.convnext_path")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and the fix."""


def path_for(out_dir, step):
    return os.path.join(out_dir, f"ckpt-{step:08d}.pt")


def step_of(path):
    match = re.fullmatch(r"ckpt-(\d+)\.pt", os.path.basename(path))
    return int(match.group(1)) if match else None


def paths(out_dir):
    """The checkpoints in `out_dir`, oldest first."""
    found = [p for p in glob.glob(os.path.join(out_dir, PATTERN)) if step_of(p) is not None]
    return sorted(found, key=step_of)


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path, state, keep_last=None):
    """Write `state` to `path` atomically, then (with keep_last) keep the newest `keep_last`
    checkpoints of its folder up to this one; a checkpoint newer than `path` is never deleted. A failed write (a full disk)
    removes its temporary file, leaves every older checkpoint intact and raises CheckpointError."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise CheckpointError(f"could not write {os.path.basename(path)} in {os.path.dirname(path)}: {reason}; "
                              "older checkpoints are intact") from None
    step = step_of(path)
    if keep_last is None or step is None:
        return
    older = [p for p in paths(os.path.dirname(path)) if step_of(p) <= step]
    for old in older[:-keep_last]:
        os.remove(old)


def read(path):
    """The dict stored in `path` (weights_only), or CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty, not a torch file, or pickled objects
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch file "
                              f"({type(err).__name__}: {reason})") from None


def is_training_checkpoint(state):
    return isinstance(state, dict) and all(k in state for k in TRAINING_KEYS)


def load_training(path):
    """A training checkpoint (for --resume); a weights-only file says where it belongs instead."""
    state = read(path)
    if not is_training_checkpoint(state):
        raise CheckpointError(f"{path} is not a training checkpoint (it holds weights only, no optimizer state or "
                              "step); to start a new run from its weights use training.init_from, to sample from it "
                              "use eval.py")
    if state["optimizer"] is None:
        raise CheckpointError(f"{path} holds no optimizer state (an inference build); start a new run from its "
                              "weights with training.init_from, or sample from it with eval.py")
    if state.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format']}, newer than this code's "
                              f"{FORMAT_VERSION}; update the repo")
    return state


def latest_readable(out_dir, warn=print):
    """(path, state) of the newest readable checkpoint in out_dir, or (None, None); each newer
    unreadable one is reported through `warn` and skipped (a truncated or empty file)."""
    for path in reversed(paths(out_dir)):
        try:
            return path, load_training(path)
        except CheckpointError as err:
            warn(f"skipping {err}")
    return None, None


def select_resume(choice, out_dir, warn=print):
    """(path, state) to resume from, or (None, None) for a fresh run.

    choice: "" (fresh), "auto" (the newest readable checkpoint in out_dir) or a path. Resuming a
    path older than the newest checkpoint in out_dir would branch the run inside one folder, and
    a later `auto` would jump back to the other branch: refused, with the way to branch.
    """
    if not choice:
        return None, None
    if choice == "auto":
        return latest_readable(out_dir, warn)
    if not os.path.isfile(choice):
        raise CheckpointError(f"resume checkpoint {choice} not found; pass an existing file or --resume auto")
    state = load_training(choice)
    newer = [p for p in paths(out_dir) if step_of(p) > state["step"]
             and os.path.abspath(p) != os.path.abspath(choice)]
    if newer:
        raise CheckpointError(
            f"{out_dir} already holds {len(newer)} checkpoint(s) newer than {choice} (step {state['step']}), the newest "
            f"{os.path.basename(newer[-1])}: resuming there would mix two runs in one folder. To branch the run, "
            f"resume into a new folder: logging.out_dir=NEW_DIR --resume {choice}")
    return choice, state


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved, current):
    """Dotted keys whose values differ between two config dicts and that change the run
    (RESUME_FREE_KEYS excluded), as [(key, saved value, current value)]."""
    a, b = _flat(saved), _flat(current)
    free = lambda key: any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_FREE_KEYS)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not free(k)]


def check_resume_config(state, cfg, path, allow_change=False, warn=print):
    """Refuse (or, with allow_change, warn about) config changes that break exact resume."""
    saved = state["config"]
    current = config_lib.to_dict(cfg)
    diffs = config_differences(saved, current)
    if not diffs:
        return
    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
    if not allow_change:
        raise CheckpointError(f"the config differs from the one {path} was trained with in keys that change the run "
                              f"({listed}); resume with the saved values, or pass --allow-config-change to continue "
                              "with the new ones (no longer the same run)")
    warn(f"resuming {path} with a changed config ({listed}): no longer the same run")
