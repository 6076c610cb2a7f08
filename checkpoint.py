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

Sharded runs (training.parallel fsdp/hsdp) write `out_dir/ckpt-{step:08d}.dcp/`, a
torch.distributed.checkpoint folder: every process writes its shards of model, emas and the
optimizer's tensors (keys `model.<name>`, `emas.<i>.<name>`, `optimizer.<i>.<key>`), and rank 0
adds meta.pt, the other keys as above (model and emas "sharded", optimizer without its tensors).
It is written as `.dcp.tmp` and renamed when every process is done. Loading reshards to any
world size. `python checkpoint.py consolidate ckpt-X.dcp [out.pt]` turns it into the one-file
format (for eval.py, DDP --resume).
"""
import argparse
import errno
import glob
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import config as config_lib

FORMAT_VERSION = 1
PATTERN = "ckpt-*.pt"
SHARDED_PATTERN = "ckpt-*.dcp"
META = "meta.pt"
SHARDED = "sharded"  # the value of model and emas in a sharded checkpoint's meta.pt
TRAINING_KEYS = ("step", "model", "emas", "optimizer", "scaler", "counters", "config")

# Config keys that may differ between a checkpoint and the run that resumes it: they change
# logging, paths, the stopping point or memory use, not the optimisation trajectory. Prefixes end
# with a dot. Micro-batch and accumulation: every (processes, accumulation) split of the global
# batch trains the same model to float rounding (see README "Launching").
RESUME_FREE_KEYS = ("logging.", "resume", "sampling.", "training.max_steps", "training.epochs",
                    "training.micro_batch_size", "training.grad_accum_steps", "training.max_consecutive_nonfinite",
                    "training.compile", "training.parallel", "training.hsdp_shard_size", "training.init_from",
                    "training.init_ema", "training.init_optimizer", "training.init_v_head",
                    "data.num_workers", "data.path", "perceptual.vgg16_path",
                    "perceptual.convnext_path")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and the fix."""


def path_for(out_dir, step, sharded=False):
    return os.path.join(out_dir, f"ckpt-{step:08d}" + (".dcp" if sharded else ".pt"))


def step_of(path):
    match = re.fullmatch(r"ckpt-(\d+)\.(pt|dcp)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_sharded_path(path):
    return os.path.isdir(path) and os.path.normpath(path).endswith(".dcp")


def paths(out_dir):
    """The checkpoints (files and sharded folders) in `out_dir`, oldest first; at one step the
    one-file form (a consolidation) comes last, so it is the one taken as the newest."""
    found = [p for pattern in (PATTERN, SHARDED_PATTERN) for p in glob.glob(os.path.join(out_dir, pattern))
             if step_of(p) is not None]
    return sorted(found, key=lambda p: (step_of(p), p.endswith(".pt")))


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
        _write(tmp, {"format": FORMAT_VERSION, **state})
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise CheckpointError(f"could not write {os.path.basename(path)} in {os.path.dirname(path)}: {reason}; "
                              "older checkpoints are intact") from None
    _prune(path, keep_last)


def _prune(path, keep_last):
    """Keep the newest `keep_last` checkpoints of path's folder up to path's step (None: all)."""
    step = step_of(path)
    if keep_last is None or step is None:
        return
    older = [p for p in paths(os.path.dirname(os.path.abspath(path))) if step_of(p) <= step]
    for old in older[:-keep_last]:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def _split(state):
    """A checkpoint dict -> (flat {key: tensor} of model, emas and optimizer tensors, the rest)."""
    flat = {f"model.{n}": t for n, t in state["model"].items()}
    for i, ema in enumerate(state["emas"]):
        flat.update({f"emas.{i}.{n}": t for n, t in ema.items()})
    kept = {}
    for i, param_state in state["optimizer"]["state"].items():
        flat.update({f"optimizer.{i}.{k}": v for k, v in param_state.items() if torch.is_tensor(v)})
        kept[i] = {k: v for k, v in param_state.items() if not torch.is_tensor(v)}
    meta = {**state, "model": SHARDED, "emas": SHARDED,
            "optimizer": {"param_groups": state["optimizer"]["param_groups"], "state": kept}}
    return flat, meta


def _join(flat, meta):
    """Inverse of `_split`: the one-file checkpoint dict from the flat tensors and meta.pt."""
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    emas = [{} for _ in meta["ema_half_lives_kimg"]]
    state = {i: dict(kept) for i, kept in meta["optimizer"]["state"].items()}
    for key, value in flat.items():
        kind, index, name = key.split(".", 2) if not key.startswith("model.") else (None, None, None)
        if kind == "emas":
            emas[int(index)][name] = value
        elif kind == "optimizer":
            state[int(index)][name] = value
    optimizer = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    return {**meta, "model": model, "emas": emas, "optimizer": optimizer}


def save_sharded(path, state, keep_last=None):
    """Every process: write a checkpoint dict whose model, emas and optimizer tensors are DTensors
    (or tensors equal on every process) as the folder `path` (torch.distributed.checkpoint),
    atomically: into path.tmp, renamed by rank 0 once all processes and meta.pt are written. A
    failure anywhere raises CheckpointError on every process; older checkpoints stay intact."""
    tmp, rank = path + ".tmp", dist.get_rank()
    flat, meta = _split(state)
    reason = None
    try:
        if rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        dcp.save(flat, checkpoint_id=tmp)
        if rank == 0:
            _write(os.path.join(tmp, META), {"format": FORMAT_VERSION, **meta})
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except (Exception, CheckpointException) as err:  # OSError, or dcp's wrapping of one per process
        reason = "no space left on device" if "No space left" in str(err) else _last_line(err)
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    failed = [r for r in reasons if r]
    if failed:
        if rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {os.path.basename(path)} in {os.path.dirname(path)}: {failed[0]}; "
                              "older checkpoints are intact")
    if rank == 0:
        _prune(path, keep_last)
    dist.barrier()


def _last_line(err):
    """The last line of an error message (dcp's CheckpointException holds each rank's traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _write(path, obj):
    """torch.save `obj` to `path`, flushed and fsync'd."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_sharded(path, state):
    """Fill, in place, the model, emas and optimizer tensors (DTensors of this run's layout) of the
    checkpoint dict `state` from the folder `path`, resharding to this run's processes; every
    process calls it. CheckpointError when the folder's tensors do not fit (another model)."""
    flat, _ = _split(state)
    try:
        dcp.load(flat, checkpoint_id=path)
    except (Exception, CheckpointException) as err:  # missing keys, shapes
        reason = _last_line(err)
        raise CheckpointError(f"sharded checkpoint {path} cannot be resharded onto this run ({reason}); resume it "
                              "with the model and optimizer config it was written with") from None


def consolidate(path, out=None):
    """Turn the sharded checkpoint folder `path` into the one-file format at `out` (default: the
    folder's name with .pt), in one process; returns out."""
    meta = load_training(path)
    out = out or os.path.normpath(path)[:-len(".dcp")] + ".pt"
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
            if isinstance(m, TensorStorageMetadata)}
    dcp.load(flat, checkpoint_id=path, no_dist=True)
    save(out, {k: v for k, v in _join(flat, meta).items() if k != "format"})
    return out


def read(path):
    """The dict stored in `path` (weights_only), or CheckpointError naming the file."""
    if is_sharded_path(path):
        raise CheckpointError(f"{path} is a sharded (training.parallel fsdp/hsdp) checkpoint folder; make one file "
                              f"of it first: python checkpoint.py consolidate {path}")
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
    """A training checkpoint (for --resume); a weights-only file says where it belongs instead. For
    a sharded folder: its meta.pt (model and emas are SHARDED; `load_sharded` reads the tensors)."""
    state = read(os.path.join(path, META) if is_sharded_path(path) else path)
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
    if not (os.path.isfile(choice) or is_sharded_path(choice)):
        raise CheckpointError(f"resume checkpoint {choice} not found; pass an existing file (or .dcp folder) or "
                              "--resume auto")
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


def is_sharded_state(state):
    return state["model"] == SHARDED


def main(argv=None):
    """`python checkpoint.py consolidate ckpt-X.dcp [out.pt]`; a bad folder ends as one line."""
    parser = argparse.ArgumentParser(description="Checkpoint tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser("consolidate", help="a sharded ckpt-*.dcp folder -> one ckpt-*.pt file (eval.py, ddp)")
    cons.add_argument("path", help="the ckpt-*.dcp folder")
    cons.add_argument("out", nargs="?", default=None, help="output file (default: the folder's name with .pt)")
    args = parser.parse_args(argv)
    if not is_sharded_path(args.path):
        sys.exit(f"checkpoint error: {args.path} is not a sharded checkpoint folder (ckpt-*.dcp)")
    try:
        print(f"wrote {consolidate(args.path, args.out)}")
    except CheckpointError as err:
        sys.exit(f"checkpoint error: {err}")


if __name__ == "__main__":
    main()
