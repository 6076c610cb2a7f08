"""Fine-tuning: a fresh run's initial weights from another checkpoint (config `training.init_from`).

`resume` continues a run exactly (optimizer, step, RNG, data position). `init_from` starts a new
run at step 0 with a fresh optimizer (or the file's, `training.init_optimizer`), from the weights of
any file we read:
  - our training checkpoint (train.py's `checkpoint()`: model, emas, ...; convert.py writes the
    authors' JAX checkpoints in this layout), optionally with its EMAs (`training.init_ema`);
  - a plain state dict, in our names or the authors' (`model.official_to_ours`);
  - the authors' PyTorch release file (`pMF-B-16.pt`: `net.`-prefixed names, no v-head).

The model shape must be the checkpoint's, except:
  - model.num_classes: label rows 0 .. min(K_file, K) - 1 are kept, the null row (the last) stays
    the null row, classes the file lacks keep this model's fresh rows;
  - model.input_size at the same patch size: the patch part of the learned position embedding is
    resized bicubically on its 2-D grid (the 20 prefix-token rows are kept); RoPE is recomputed
    from the grid in every forward anyway.
A file without a v-head (release files are inference builds) gets the u-head's weights in the
v-head (`training.init_v_head: u_head`; `random` keeps the fresh v-head). Both heads read the same
trunk output, so the copy predicts v(z, t) = u(z, t, t): every guidance query of the loss runs at
h = 0, so the self-guided target is the source model's own guided velocity from the first step.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import config as config_lib
import model as model_lib

V_HEAD_PREFIXES = {"v_head.": "u_head.", "v_final.": "u_final."}
LABELS, POSITIONS = "label_embed.weight", "pos_embed"


class FinetuneError(config_lib.ConfigError):
    """A `training.init_from` file that cannot start this run; the message names the file or tensor."""


@dataclass
class Source:
    """The weights of an init_from file, in our names (EMAs only in training checkpoints)."""
    path: str
    kind: str                     # "training checkpoint" or "state dict"
    model: dict                   # {name: tensor}
    emas: Optional[list] = None   # [{name: tensor}, ...] or None
    optimizer: Optional[dict] = None  # MuonAdamW.state_dict() of a training checkpoint, or None


def read_source(path):
    """Read our training checkpoint, a plain state dict or a release file; names mapped to ours."""
    if not os.path.isfile(path):
        raise FinetuneError(f"training.init_from: {path} not found; point it at a checkpoint "
                            "(ours, a converted JAX file or the authors' release .pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpicklable or foreign file: one line, not a traceback
        raise FinetuneError(f"training.init_from: cannot read {path} as a PyTorch checkpoint "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        emas = [model_lib.official_to_ours(e) for e in state["emas"]] if state.get("emas") else None
        return Source(path, "training checkpoint", model_lib.official_to_ours(state["model"]), emas,
                      state.get("optimizer") or None)
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        return Source(path, "state dict", model_lib.official_to_ours(state))
    raise FinetuneError(f"training.init_from: {path} is neither a training checkpoint (a dict with 'model') "
                        "nor a state dict of tensors")


def resize_label_table(saved, fresh):
    """(K_file + 1, D) label table -> (K + 1, D): rows of the shared classes and the null row (last)
    from the file, the other rows from `fresh` (this model's initialisation)."""
    out = fresh.detach().clone()
    shared = min(saved.shape[0], fresh.shape[0]) - 1
    out[:shared] = saved[:shared]
    out[-1] = saved[-1]
    return out


def resize_pos_embed(saved, grid, num_prefix):
    """(1, P + g_file^2, D) -> (1, P + grid^2, D): prefix rows kept, the patch rows resized as a
    g_file x g_file image of D channels (row-major, as the patch tokens) by antialiased bicubic
    interpolation, cell centres onto cell centres (timm's resample_abs_pos_embed defaults; torch's
    antialiased kernel is the Keys a = -0.5 cubic, widened when shrinking)."""
    prefix, patches = saved[:, :num_prefix], saved[0, num_prefix:]
    side = math.isqrt(patches.shape[0])
    image = patches.reshape(side, side, -1).permute(2, 0, 1)[None].float()
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    resized = resized[0].permute(1, 2, 0).reshape(1, grid * grid, -1).to(saved.dtype)
    return torch.cat([prefix, resized], dim=1)


def _shape_error(path, name, saved, own):
    return FinetuneError(
        f"training.init_from: tensor {name!r} of {path} has shape {tuple(saved.shape)}, this model's is "
        f"{tuple(own.shape)}; init_from keeps the checkpoint's model shape except model.num_classes and "
        "model.input_size (same patch size): set the other model.* keys as the checkpoint was trained")


def _v_head_from_file_or_u_head(state, net, fresh, v_head_init):
    """(state with the model's v-head tensors, notes): the file's v-head, else a copy of its u-head
    (v_head_init "u_head") or the fresh v-head ("random"); dropped for a model without v-head."""
    heads = tuple(V_HEAD_PREFIXES)
    if not net.has_v_head:
        return {k: v for k, v in state.items() if not k.startswith(heads)}, []
    if any(k.startswith(heads) for k in state):
        return dict(state), []
    if v_head_init == "random":
        return {**state, **{k: t for k, t in fresh.items() if k.startswith(heads)}}, [
            "v-head: the file has none; kept fresh (training.init_v_head=random)"]
    copies = {v_prefix + k[len(u_prefix):]: t for v_prefix, u_prefix in V_HEAD_PREFIXES.items()
              for k, t in state.items() if k.startswith(u_prefix)}
    return {**state, **copies}, ["v-head: the file has none; copied from the u-head, so v(z, t) = u(z, t, t) "
                                 "at the start (training.init_v_head=random keeps a fresh v-head)"]


def adapt(state, net, fresh, path, v_head_init="u_head"):
    """State dict for `net` from a file's (our names): (weights, notes on what was not copied as is).

    fresh: net's initial state dict (rows the file cannot give come from it). Tensors without a
    place in the model, missing tensors and shape mismatches other than the two adaptable ones
    raise FinetuneError naming the tensor.
    """
    state, notes = _v_head_from_file_or_u_head(state, net, fresh, v_head_init)
    for name in state:
        if name not in fresh:
            raise FinetuneError(f"training.init_from: tensor {name!r} of {path} has no place in this model; "
                                "set the model.* keys as the checkpoint was trained")
    out = {}
    for name, own in fresh.items():
        if name not in state:
            raise FinetuneError(f"training.init_from: {path} has no tensor {name!r}; "
                                "set the model.* keys as the checkpoint was trained")
        saved = state[name]
        if saved.shape == own.shape:
            out[name] = saved
        elif name == LABELS and saved.dim() == 2 and saved.shape[1] == own.shape[1]:
            out[name] = resize_label_table(saved, own)
            notes.append(_label_note(saved.shape[0] - 1, own.shape[0] - 1))
        elif (name == POSITIONS and saved.dim() == 3 and saved.shape[::2] == own.shape[::2]
              and _is_square(saved.shape[1] - net.num_prefix)):
            out[name] = resize_pos_embed(saved, net.grid, net.num_prefix)
            side = math.isqrt(saved.shape[1] - net.num_prefix)
            notes.append(f"pos_embed: patch grid {side}x{side} -> {net.grid}x{net.grid} by bicubic interpolation, "
                         f"{net.num_prefix} prefix-token rows kept; RoPE recomputed for the new grid")
        else:
            raise _shape_error(path, name, saved, own)
    return out, notes


def _is_square(n):
    return n > 0 and math.isqrt(n) ** 2 == n


def _label_note(file_classes, classes):
    if classes > file_classes:
        change = f"classes {file_classes}..{classes - 1} get fresh rows"
    else:
        change = f"the file's classes {classes}..{file_classes - 1} are dropped"
    return (f"label table: {file_classes} classes in the file, {classes} here; rows 0..{min(file_classes, classes) - 1} "
            f"kept, {change}, the null row stays the null label")


def initial_weights(cfg, net, ema, log=print, opt=None):
    """Load `cfg.training.init_from` into `net` and `ema` for a fresh run; no-op when it is empty.

    net: the freshly built (unwrapped, not yet DDP-prepared) model; ema: train.EMA over its
    parameters, reset here to the loaded weights, or to the file's EMAs with training.init_ema
    (same count as training.ema_half_lives_kimg); opt: net's MuonAdamW, given the file's moments
    with training.init_optimizer. log: one call per line.
    Raises FinetuneError (a config_lib.ConfigError) with one line naming the file or tensor.
    """
    t = cfg.training
    if not t.init_from:
        return
    source = read_source(t.init_from)
    fresh = {k: v.detach().clone() for k, v in net.state_dict().items()}
    weights, notes = adapt(source.model, net, fresh, source.path, t.init_v_head)
    net.load_state_dict(weights)
    if t.init_ema:
        emas = _file_emas(source, t, net, fresh)
        ema_text = f"its {len(emas)} EMAs"
    else:
        emas = [weights] * len(t.ema_half_lives_kimg)
        ema_text = "EMAs start at these weights"
    ema.load_state_dicts([{k: v.float() for k, v in e.items()} for e in emas])
    if t.init_optimizer:
        load_optimizer_moments(opt, source, net, notes)
    opt_text = "the file's optimizer moments" if t.init_optimizer else "fresh optimizer"
    log(f"init_from {source.path} ({source.kind}): weights loaded, {ema_text}; step 0, {opt_text}")
    for note in notes:
        log(f"init_from: {note}")
    first_images = t.ema_rampup * t.global_batch_size
    if t.init_ema and first_images < 1000 * min(t.ema_half_lives_kimg):
        log(f"init_from: the EMA ramp-up (training.ema_rampup={t.ema_rampup:g}) shortens every half-life to "
            f"{first_images:g} images on step 1, which replaces the loaded EMAs within the first steps")


def _file_emas(source, t, net, fresh):
    if source.emas is None:
        raise FinetuneError(f"training.init_ema: {source.path} ({source.kind}) holds no EMAs; "
                            "set training.init_ema=false")
    if len(source.emas) != len(t.ema_half_lives_kimg):
        raise FinetuneError(f"training.init_ema: {source.path} holds {len(source.emas)} EMAs, "
                            f"training.ema_half_lives_kimg lists {len(t.ema_half_lives_kimg)}; make the counts equal "
                            "or set training.init_ema=false")
    return [adapt(e, net, fresh, f"{source.path} (EMA {i})", t.init_v_head)[0] for i, e in enumerate(source.emas)]


def load_optimizer_moments(opt, source, net, notes):
    """The file's MuonAdamW state (momenta, second moments, per-parameter step counts) into `opt`;
    this config's hyperparameters (lr, betas, ...) are kept. Needs the file's exact model shape and
    partition: an adapted tensor (labels, positions, a copied v-head) has no matching moments."""
    where = f"training.init_optimizer: {source.path} ({source.kind})"
    if opt is None:  # train.py builds the sharded optimizer after fully_shard, past this point
        raise FinetuneError("training.init_optimizer works with training.parallel=ddp only; "
                            "set training.init_optimizer=false for fsdp or hsdp")
    if source.optimizer is None:
        raise FinetuneError(f"{where} holds no optimizer state; set training.init_optimizer=false")
    if notes:
        raise FinetuneError(f"{where}: its moments fit its own model shape only, and this run adapts it "
                            f"({notes[0]}); set training.init_optimizer=false")
    saved_sizes = [len(g["params"]) for g in source.optimizer["param_groups"]]
    own_sizes = [len(g["params"]) for g in opt.param_groups]
    if saved_sizes != own_sizes:
        raise FinetuneError(f"{where} has parameter groups of {saved_sizes} tensors, this run's optimizer "
                            f"{own_sizes}; use the file's optim.partition or set training.init_optimizer=false")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(source.optimizer)
    for group, own in zip(opt.param_groups, settings):
        group.update(own)
