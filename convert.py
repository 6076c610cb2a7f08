"""Convert an authors' JAX checkpoint (github.com/Lyy-iiis/pMF, `main`/`hsdp`) to our checkpoint.

    python convert.py pMF-B-16-full.zip --out converted.pt [--model pMF-B/16]
    python train.py --resume converted.pt ...          # continues the official run
    python eval.py --ckpt converted.pt --ref-stats ...  # samples from its EMAs

The official `TrainState` (`utils/trainstate_util.py`: params, optax `contrib.muon` state,
`ema_params` keyed by EMA half-life in kimg, step) is saved by flax's
`checkpoints.save_checkpoint_multiprocess` (`utils/ckpt_util.py`); a zip, a directory holding
`checkpoint_<step>`, or the checkpoint itself are read. Layouts as the authors' torch port:
Dense kernels (in, out) are transposed, conv kernels (kh, kw, in, out) -> (out, in, kh, kw), the
label table (1, classes + 1, D) loses its leading axis, RoPE tables are not stored (recomputed).
Names go flax -> torch port -> ours (`model.official_to_ours`).

Reading needs jax, flax and orbax-checkpoint (`pip install ".[convert]"`); only this file imports them.
"""
import argparse
import math
import os
import re
import sys
import tempfile
import zipfile

import numpy as np
import torch

import checkpoint as checkpoint_lib
import config as config_lib
import model as model_lib

EXTRA_HINT = 'pip install ".[convert]"'
CONST_EMA_BATCH = 1024  # the official global batch, for expressing a constant EMA decay as a half-life
MUON, ADAMW = "muon", "adamw"


class ConvertError(RuntimeError):
    """A problem with the input checkpoint or the request, explained for the user."""


# ---------------------------------------------------------------- reading the JAX checkpoint

def _flax_checkpoints():
    try:
        from flax.training import checkpoints
    except ImportError as err:
        raise ConvertError(f"reading JAX checkpoints needs jax, flax and orbax-checkpoint ({err.name or err} is "
                           f"missing): {EXTRA_HINT}") from None
    return checkpoints


def _is_checkpoint(path):
    """An orbax checkpoint directory or a legacy flax msgpack file `checkpoint_<step>`."""
    if os.path.isdir(path):
        return any(os.path.exists(os.path.join(path, f)) for f in ("_METADATA", "_CHECKPOINT_METADATA", "checkpoint"))
    return bool(re.fullmatch(r"checkpoint_\d+", os.path.basename(path)))


def find_checkpoint(root):
    """The checkpoint at or under `root`: itself, or the `checkpoint_<step>` with the largest step."""
    if _is_checkpoint(root):
        return root
    found = []
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            if re.fullmatch(r"checkpoint_\d+", name) and _is_checkpoint(path):
                found.append((int(name.split("_")[1]), path))
        dirs[:] = [d for d in dirs if not re.fullmatch(r"checkpoint_\d+", d)]
    if not found:
        raise ConvertError(f"{root}: no flax checkpoint (an orbax directory or a checkpoint_<step> file) inside")
    return max(found)[1]


def _as_tree(node):
    """Restored state -> nested dicts of numpy arrays (str keys); None (masked optax leaves) kept."""
    if isinstance(node, dict):
        return {str(k): _as_tree(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return {str(i): _as_tree(v) for i, v in enumerate(node)}
    return None if node is None else np.asarray(node)


def read_official(path):
    """The official TrainState at `path` (zip, directory or checkpoint) as a nested dict:
    {'step', 'params', 'opt_state', 'ema_params'} (whichever the file holds)."""
    if not os.path.exists(path):
        raise ConvertError(f"{path} not found; pass the authors' checkpoint directory or .zip")
    checkpoints = _flax_checkpoints()
    with tempfile.TemporaryDirectory() as tmp:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                zf.extractall(tmp)
            root = tmp
        elif os.path.isfile(path) and not _is_checkpoint(path):
            raise ConvertError(f"{path} is neither a .zip nor a flax checkpoint (checkpoint_<step> file or directory)")
        else:
            root = path
        ckpt = find_checkpoint(root)
        state = checkpoints.restore_checkpoint(ckpt, target=None)
    if not isinstance(state, dict) or not ({"params", "ema_params"} & set(state)):
        raise ConvertError(f"{path}: not a pMF TrainState (expected params / ema_params / opt_state / step)")
    return _as_tree(state)


def flatten(tree, prefix=""):
    """Nested dict -> {'a/b/c': array}, skipping None and empty nodes."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        elif value is not None:
            flat[name] = value
    return flat


# ---------------------------------------------------------------- names and layouts

def torch_port_name(flax_path):
    """A flax path -> the authors' torch port's name, e.g. 'net/shared_blocks_0/attn/q_proj/_flax_linear/kernel'
    -> 'shared_blocks.0.attn.q_proj._flax_linear.weight'."""
    name = re.sub(r"^net/", "", flax_path)
    name = re.sub(r"\b(shared_blocks|u_heads|v_heads)_(\d+)\b", r"\1/\2", name)
    name = re.sub(r"/mlp/layers_(\d+)/", r"/mlp/\1/", name)
    name = re.sub(r"embedding_table/embedding$", "embedding_table/_flax_embedding/weight", name)
    name = re.sub(r"/kernel$", "/weight", name)
    return name.replace("/", ".")


def to_torch_layout(flax_path, array):
    """One flax leaf in our layout: Dense kernels transposed, conv kernels (kh, kw, in, out) ->
    (out, in, kh, kw), the 3-D label table (1, N, D) -> (N, D); everything else unchanged."""
    tensor = torch.from_numpy(np.array(array))
    if flax_path.endswith("embedding_table/embedding"):
        return tensor[0]
    if flax_path.endswith("kernel") and tensor.ndim == 2:
        return tensor.T.contiguous()
    if flax_path.endswith("kernel") and tensor.ndim == 4:
        return tensor.permute(3, 2, 0, 1).contiguous()
    return tensor


def convert_tree(tree):
    """A params-shaped flax tree ({'net': ...} or the net itself) -> {our name: tensor}."""
    flat = flatten(tree.get("net", tree))
    ported = {torch_port_name(path): to_torch_layout(path, value) for path, value in flat.items()}
    return model_lib.official_to_ours(ported)


# ---------------------------------------------------------------- model shape

def infer_shape(state):
    """build_model keyword arguments read off our-named weights."""
    conv1, embed = state["patch_embed.conv1.weight"], state["label_embed.weight"]
    hidden = state["pos_embed"].shape[-1]
    patches = state["pos_embed"].shape[1] - sum(model_lib.PREFIX_TOKENS.values())
    grid = math.isqrt(patches)
    count = lambda part: len({k.split(".")[1] for k in state if k.startswith(part + ".")})
    return dict(input_size=grid * conv1.shape[-1], in_channels=conv1.shape[1], num_classes=embed.shape[0] - 1,
                depth=count("trunk") + count("u_head"), hidden_size=hidden,
                num_heads=hidden // state["u_head.0.attn.q_norm.weight"].shape[0],
                patch_size=conv1.shape[-1], head_depth=count("u_head"))


def resolve_model(shape, requested=None):
    """(preset name, shape overrides): the preset whose shapes match, checked against `requested`.

    Shapes matching no preset need `requested` (the recipe to train them with) and become overrides."""
    matches = [name for name, preset in model_lib.PRESETS.items()
               if all(shape[k] == preset[k] for k in preset) and shape["head_depth"] == 8
               and shape["in_channels"] == 3 and shape["num_classes"] == 1000]
    if matches:
        if requested is not None and requested != matches[0]:
            raise ConvertError(f"the checkpoint's shapes are {matches[0]}, not --model {requested}")
        return matches[0], {}
    described = ", ".join(f"{k}={v}" for k, v in shape.items())
    if requested is None:
        raise ConvertError(f"the checkpoint's shapes ({described}) match no preset; pass --model NAME for the "
                           "recipe, the shapes are then kept as model.* overrides")
    if requested not in model_lib.PRESETS:
        raise ConvertError(f"unknown --model {requested!r}; choose one of {sorted(model_lib.PRESETS)}")
    return requested, shape


# ---------------------------------------------------------------- EMAs and optimizer state

def ema_half_life_kimg(key):
    """An `ema_params` key -> (half-life in kimg, note). Keys >= 1 are EDM half-lives in kimg
    (`ema_type: edm`); keys < 1 are constant decays, expressed at the official batch of 1024."""
    value = float(key)
    if value >= 1:
        return value, None
    half = CONST_EMA_BATCH * math.log(0.5) / math.log(value) / 1000
    return half, (f"EMA {key} is a constant decay; kept as half-life {half:.6g} kimg at batch {CONST_EMA_BATCH} "
                  "(our EMAs ramp the half-life up over the first steps; identical after that)")


def optimizer_moments(opt_state):
    """The optax muon state -> {'muon': {'count', 'mu'}, 'adamw': {'count', 'mu', 'nu'}}: every node
    holding a params-shaped `mu` is a branch's moment state; the one with `nu` is AdamW's."""
    found = {}

    def visit(node, path):
        if not isinstance(node, dict):
            return
        if isinstance(node.get("mu"), dict) and "count" in node:
            branch = ADAMW if isinstance(node.get("nu"), dict) else MUON
            if branch in found:
                raise ConvertError(f"opt_state holds two {branch} moment states ({found[branch]['path']}, {path})")
            found[branch] = {**node, "path": path}
            return
        for key, value in node.items():
            visit(value, f"{path}/{key}")

    visit(opt_state or {}, "opt_state")
    return found


def optimizer_state(net, opt, moments):
    """Load the official moments into `opt` (a MuonAdamW over `net`, partition 'official') and return
    its state_dict. Muon: mu (Dense layout transposed). AdamW: mu, nu. step: the branch's count."""
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        branch = MUON if group["use_muon"] else ADAMW
        if branch not in moments:
            raise ConvertError(f"opt_state has no {branch} moments; not a full (training) checkpoint")
        source = moments[branch]
        tensors = {k: convert_tree(source[k]) for k in ("mu", "nu") if k in source}
        expected = {names[id(p)] for p in group["params"]}
        if set(tensors["mu"]) != expected:
            extra, missing = sorted(set(tensors["mu"]) - expected), sorted(expected - set(tensors["mu"]))
            raise ConvertError(f"the official {branch} branch covers other parameters than ours: "
                               f"only theirs {extra[:3]}, only ours {missing[:3]}")
        for p in group["params"]:
            name = names[id(p)]
            opt.state[p] = {"step": int(source["count"]), **{k: t[name].to(p.dtype) for k, t in tensors.items()}}
    return opt.state_dict()


# ---------------------------------------------------------------- our checkpoint

def training_config(name, overrides, half_lives_kimg):
    """Our full config for the converted run: defaults with the preset, its shapes and the EMAs."""
    items = [f"model.name={name}", f"training.ema_half_lives_kimg={list(half_lives_kimg)}"]
    items += [f"model.{k}={v}" for k, v in overrides.items()]
    try:
        return config_lib.to_dict(config_lib.load_config(None, items))
    except config_lib.ConfigError as err:
        raise ConvertError(f"config for the converted checkpoint: {err}") from None


def to_training_checkpoint(step, model_state, emas, half_lives_kimg, optimizer, cfg_dict):
    """The dict train.py resumes from and eval.py loads (train.py's checkpoint format).

    optimizer is MuonAdamW.state_dict() or None (inference files: sampling only, no resume)."""
    return {"step": step, "model": model_state, "emas": emas, "ema_half_lives_kimg": list(half_lives_kimg),
            "optimizer": optimizer, "scaler": {}, "rng": [], "counters": {"skipped_steps": 0, "skipped_images": 0},
            "nonfinite_streak": 0, "config": cfg_dict}


def _weight_sets(official, model_name, report):
    """(net, preset, overrides, raw weights, [(half-life kimg, EMA weights)]) in our names, each
    set checked against the inferred model (load_weights: names and shapes)."""
    params = convert_tree(official["params"]) if official.get("params") else None
    emas = []
    for key, tree in (official.get("ema_params") or {}).items():
        half_life, note = ema_half_life_kimg(key)
        emas.append((half_life, convert_tree(tree)))
        if note:
            report.append(note)
    emas.sort(key=lambda item: item[0])
    if params is None and not emas:
        raise ConvertError("the checkpoint holds neither params nor ema_params")
    weights = params if params is not None else emas[-1][1]
    name, overrides = resolve_model(infer_shape(weights), model_name)
    net = model_lib.build_model(name, **overrides)
    for what, state in [(f"EMA {h:g} kimg", s) for h, s in emas] + [("params", weights)]:
        try:
            model_lib.load_weights(net, state, source=what)
        except ValueError as err:
            raise ConvertError(str(err)) from None
    if params is None:
        report.append("no raw params in the file: model = the longest EMA")
    return net, name, overrides, weights, emas


def _optimizer(net, cfg_dict, moments, report):
    """MuonAdamW.state_dict() holding the official moments, built as train.py builds it."""
    import train
    opt = train.build_optimizer(config_lib.from_dict(cfg_dict), net)
    state = optimizer_state(net, opt, moments)
    ns = moments[MUON].get("ns_coeffs")
    if ns is not None and not np.allclose(np.asarray(ns).reshape(-1, 3)[-1], opt.defaults["ns_coeffs"]):
        report.append(f"warning: the file's Newton-Schulz coefficients {np.asarray(ns).tolist()} differ from "
                      f"ours {opt.defaults['ns_coeffs']}")
    report.append(f"optimizer: Muon mu -> state['mu'] of {len(opt.param_groups[0]['params'])} matrices "
                  f"(step {int(moments[MUON]['count'])}); AdamW mu, nu -> state['mu'], state['nu'] of "
                  f"{len(opt.param_groups[1]['params'])} tensors (step {int(moments[ADAMW]['count'])})")
    report.append("not carried: the official data order, RNG streams and learning-rate schedule count; a "
                  "resumed run draws its batches, noise, t, r and omega from our (seed, step)")
    return state


def convert(official, model_name=None):
    """(our checkpoint dict, report lines) from a read_official() tree."""
    step = int(official.get("step", 0))
    report = [f"step {step}"]
    net, name, overrides, weights, emas = _weight_sets(official, model_name, report)
    has_v = any(k.startswith("v_head.") for k in weights)
    report.append(f"model: {name}" + (f" with shape overrides {overrides}" if overrides else "")
                  + (", both heads" if has_v else ", u-head only (inference build)"))
    if emas:
        half_lives, ema_states = [h for h, _ in emas], [s for _, s in emas]
        report += [f"EMA half-life {h:g} kimg -> emas[{i}]" for i, h in enumerate(half_lives)]
    else:
        half_lives = config_lib.load_config(None).training.ema_half_lives_kimg
        ema_states = [weights] * len(half_lives)
        report.append(f"no EMAs in the file: emas for half-lives {half_lives} kimg start from the params")
    cfg_dict = training_config(name, overrides, half_lives)
    moments = optimizer_moments(official.get("opt_state"))
    optimizer = None
    if has_v and set(moments) == {MUON, ADAMW}:
        optimizer = _optimizer(net, cfg_dict, moments, report)
    else:
        why = "inference build (no v-head)" if not has_v else "no Muon/AdamW state in the file"
        report.append(f"optimizer: none ({why}); the output samples (eval.py) but cannot resume training")
    return to_training_checkpoint(step, weights, ema_states, half_lives, optimizer, cfg_dict), report


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert an authors' JAX pMF checkpoint to ours.")
    parser.add_argument("path", help="pMF-*.zip / pMF-*-full.zip, a directory holding checkpoint_<step>, "
                                     "or the checkpoint")
    parser.add_argument("--out", required=True, help="output .pt (train.py --resume / eval.py --ckpt)")
    parser.add_argument("--model", default=None, help="expected preset, e.g. pMF-B/16 (checked against the shapes)")
    args = parser.parse_args(argv)
    try:
        ckpt, report = convert(read_official(args.path), args.model)
    except ConvertError as err:
        sys.exit(f"convert: {err}")
    checkpoint_lib.save(args.out, ckpt)
    for line in report:
        print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
