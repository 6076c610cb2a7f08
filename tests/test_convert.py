"""convert.py against a real flax checkpoint: a tiny model with the official module tree
(tests/flax_pmf.py), its TrainState with optax Muon state and three EMAs, saved with flax's own
checkpoint function, converted, then compared forward for forward and step for step."""
import os
import sys
import zipfile

import numpy as np
import pytest
import torch

import config as config_lib
import convert
import model as model_lib
from conftest import TINY

HALF_LIVES = (500, 1000, 2000)
STEPS = 2  # official optimizer steps before the save


@pytest.fixture(scope="module")
def jax_side(tmp_path_factory):
    """(flax module, official TrainState, checkpoint dir) for the TINY shape."""
    jax = pytest.importorskip("jax", reason="the converter test needs the convert extra: pip install '.[convert]'")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)  # float64 forwards; arrays stay float32 unless asked
    import flax_pmf
    net = flax_pmf.PmfDiT(**TINY)
    state = flax_pmf.official_train_state(net, HALF_LIVES, STEPS)
    workdir = tmp_path_factory.mktemp("official")
    flax_pmf.save_official(state, str(workdir))
    return net, state, workdir


@pytest.fixture(scope="module")
def converted(jax_side, tmp_path_factory):
    """(our checkpoint dict, report lines, its path), converted from a zip of the checkpoint."""
    _, _, workdir = jax_side
    archive = tmp_path_factory.mktemp("zip") / "pMF-tiny-full.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for parent, _, files in os.walk(workdir):
            for name in files:
                path = os.path.join(parent, name)
                zf.write(path, os.path.join("pMF-tiny-full", os.path.relpath(path, workdir)))
    ckpt, report = convert.convert(convert.read_official(str(archive)), "pMF-B/16")
    path = tmp_path_factory.mktemp("ours") / "converted.pt"
    torch.save(ckpt, path)
    return ckpt, report, path


def ours(ckpt, weights, dtype):
    cfg = config_lib.from_dict(ckpt["config"])
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
    model_lib.load_weights(net, weights)
    return net.to(dtype).eval()


def inputs(dtype, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, TINY["input_size"], TINY["input_size"], generator=g, dtype=dtype)
    h = torch.rand(n, generator=g, dtype=dtype)
    omega = 1 + 6 * torch.rand(n, generator=g, dtype=dtype)
    t_min = 0.3 * torch.rand(n, generator=g, dtype=dtype)
    t_max = 0.6 + 0.4 * torch.rand(n, generator=g, dtype=dtype)
    y = torch.tensor([0, 3, TINY["num_classes"], 7])  # includes the null label
    return z, h, omega, t_min, t_max, y


_JITTED = {}


def flax_forward(net, params, args, dtype):
    """The flax model's raw head outputs, NCHW, on `params` cast to `dtype`."""
    import jax
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    params = jax.tree.map(lambda p: np.asarray(p, np_dtype), params)
    z, *scalars, y = args
    apply = _JITTED.setdefault(id(net), jax.jit(net.apply))
    outs = apply({"params": params["net"]}, z.permute(0, 2, 3, 1).numpy(), *(s.numpy() for s in scalars), y.numpy())
    return [torch.from_numpy(np.array(o)).permute(0, 3, 1, 2) for o in outs]


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_forward_matches_flax_model(jax_side, converted, dtype, tol):
    flax_net, state, _ = jax_side
    ckpt, _, _ = converted
    args = inputs(dtype)
    weight_sets = [(state.params, ckpt["model"])] + [(state.ema_params[h], ckpt["emas"][i])
                                                      for i, h in enumerate(HALF_LIVES)]
    for theirs, mine in weight_sets:
        expected = flax_forward(flax_net, theirs, args, dtype)
        with torch.no_grad():
            got = ours(ckpt, mine, dtype)(*args, heads="uv")
        for g, e in zip(got, expected):
            assert g.dtype == dtype
            assert max_rel_err(g, e) < tol, max_rel_err(g, e)


def test_emas_named_by_half_life_and_step(converted):
    ckpt, report, _ = converted
    assert ckpt["step"] == STEPS and ckpt["ema_half_lives_kimg"] == [float(h) for h in HALF_LIVES]
    assert config_lib.from_dict(ckpt["config"]).training.ema_half_lives_kimg == [float(h) for h in HALF_LIVES]
    assert any("EMA half-life 2000 kimg -> emas[2]" in line for line in report)
    assert any(line.startswith("not carried:") for line in report)


def official_leaf(tree, name):
    """The official array behind our parameter `name`, in our layout."""
    return convert.convert_tree(tree)[name]


def test_optimizer_state_lands_where_muonadamw_reads_it(jax_side, converted):
    import train
    _, state, _ = jax_side
    ckpt = torch.load(converted[2], weights_only=True)  # loading aliases the tensors; a step would change them
    cfg = config_lib.from_dict(ckpt["config"])
    net = ours(ckpt, ckpt["model"], torch.float32).train()
    opt = train.build_optimizer(cfg, net)
    opt.load_state_dict(ckpt["optimizer"])
    inner = state.opt_state.inner_states
    muon_state, adam_state = inner["muon"].inner_state[0], inner["adam"].inner_state[0]
    names = {id(p): n for n, p in net.named_parameters()}
    muon_group, adam_group = opt.param_groups
    assert muon_group["use_muon"] and not adam_group["use_muon"]
    assert "label_embed.weight" in {names[id(p)] for p in adam_group["params"]}
    assert "u_final.linear.weight" in {names[id(p)] for p in muon_group["params"]}
    for p in muon_group["params"]:
        s = opt.state[p]
        assert set(s) == {"step", "mu"} and s["step"] == STEPS
        assert torch.equal(s["mu"], official_leaf(jax_tree(muon_state.mu), names[id(p)]))
    for p in adam_group["params"]:
        s = opt.state[p]
        assert set(s) == {"step", "mu", "nu"} and s["step"] == STEPS
        assert torch.equal(s["mu"], official_leaf(jax_tree(adam_state.mu), names[id(p)]))
        assert torch.equal(s["nu"], official_leaf(jax_tree(adam_state.nu), names[id(p)]))


def jax_tree(tree):
    """An optax moment tree as convert reads it from a file (masked leaves are empty nodes)."""
    from flax import serialization
    return convert._as_tree(serialization.to_state_dict(tree))


def test_next_step_continues_the_official_run(jax_side, converted):
    """One more official optax step and one MuonAdamW step from the converted state, on the same
    gradient, give the same parameters (Muon's Nesterov/bias correction uses the carried count)."""
    import flax_pmf
    import train
    _, state, _ = jax_side
    ckpt = torch.load(converted[2], weights_only=True)
    grads = flax_pmf.random_grads(state.params, seed=99)
    after = convert.convert_tree(flax_pmf.update(state, grads).params)
    net = ours(ckpt, ckpt["model"], torch.float32).train()
    opt = train.build_optimizer(config_lib.from_dict(ckpt["config"]), net)
    opt.load_state_dict(ckpt["optimizer"])
    ported = convert.convert_tree(grads)
    for name, p in net.named_parameters():
        p.grad = ported[name].clone()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    for name, p in net.named_parameters():
        moved = (after[name] - before[name]).abs().max()
        assert moved > 0, name
        assert (p.detach() - after[name]).abs().max() <= 1e-3 * moved + 1e-7, name


def test_train_resumes_the_converted_checkpoint(converted, tmp_path):
    import train
    from test_train import tiny
    _, _, path = converted
    overrides = tiny(tmp_path, f"training.max_steps={STEPS + 1}", "training.ema_half_lives_kimg=[500, 1000, 2000]")
    # the converted config is the official B/16 recipe (ImageNet, batch 1024, perceptual terms): this tiny
    # continuation on dummy data changes the run, so it says so
    assert train.train(config_lib.load_config(None, overrides), str(path), allow_config_change=True) == STEPS + 1
    resumed = torch.load(tmp_path / f"ckpt-{STEPS + 1:08d}.pt", weights_only=True)
    assert resumed["step"] == STEPS + 1
    assert all(s["step"] == STEPS + 1 for s in resumed["optimizer"]["state"].values())


def test_inference_file_samples_but_does_not_resume(jax_side, tmp_path):
    """A release-style file: eval build (no v-head), optax.sgd state, one EMA (`just_evaluate`)."""
    import eval as eval_lib
    import flax_pmf
    _, _, _ = jax_side
    net = flax_pmf.PmfDiT(**TINY, with_v_head=False)
    state = flax_pmf.official_inference_state(net, 2000)
    flax_pmf.save_official(state, str(tmp_path / "official"))
    ckpt, report = convert.convert(convert.read_official(str(tmp_path / "official")), "pMF-B/16")
    assert ckpt["optimizer"] is None and not any(k.startswith("v_") for k in ckpt["model"])
    assert ckpt["ema_half_lives_kimg"] == [2000.0] and any("cannot resume" in line for line in report)
    torch.save(ckpt, tmp_path / "c.pt")
    generator, _, which, _ = eval_lib.load_generator(str(tmp_path / "c.pt"), ema="0")
    args = inputs(torch.float32)
    with torch.no_grad():
        got = generator(*args, heads="u")[0]
    expected = flax_forward(net, state.ema_params[2000], args, torch.float32)[0]
    assert which == "ema 2000 kimg" and max_rel_err(got, expected) < 1e-5


@pytest.mark.filterwarnings("ignore:Flax Checkpointing will soon be deprecated:DeprecationWarning")
def test_legacy_msgpack_checkpoint_reads_the_same(jax_side, tmp_path):
    """flax without its orbax backend writes one msgpack file checkpoint_<step>; same tree."""
    import flax
    import flax_pmf
    _, state, workdir = jax_side
    flax.config.update("flax_use_orbax_checkpointing", False)
    try:
        flax_pmf.save_official(state, str(tmp_path))
    finally:
        flax.config.update("flax_use_orbax_checkpointing", True)
    assert os.path.isfile(tmp_path / f"checkpoint_{STEPS}")
    legacy, orbax = convert.read_official(str(tmp_path)), convert.read_official(str(workdir))
    flat_legacy, flat_orbax = convert.flatten(legacy), convert.flatten(orbax)
    assert set(flat_legacy) == set(flat_orbax)
    assert all(np.array_equal(flat_legacy[k], flat_orbax[k]) for k in flat_orbax)


def test_cli_reports_mapping_and_writes(jax_side, tmp_path, capsys):
    _, _, workdir = jax_side
    out = tmp_path / "c.pt"
    convert.main([str(workdir), "--out", str(out), "--model", "pMF-B/16"])
    printed = capsys.readouterr().out
    assert "optimizer: Muon mu -> state['mu']" in printed and f"wrote {out}" in printed
    assert torch.load(out, weights_only=True)["step"] == STEPS


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as err:
        convert.main([str(tmp_path / "missing.zip"), "--out", str(tmp_path / "x.pt")])
    assert "not found" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "flax.training", None)  # as if flax were not installed
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SystemExit) as err:
        convert.main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "x.pt")])
    assert '.[convert]' in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(model_lib.PRESETS))
def test_preset_inferred_from_shapes_and_checked(name):
    with torch.device("meta"):
        state = model_lib.build_model(name).state_dict()
    shape = convert.infer_shape(state)
    assert convert.resolve_model(shape) == (name, {})
    assert convert.resolve_model(shape, name) == (name, {})
    other = next(n for n in model_lib.PRESETS if n != name)
    with pytest.raises(convert.ConvertError, match=f"not --model {other}"):
        convert.resolve_model(shape, other)


def test_custom_shape_needs_model():
    with torch.device("meta"):
        shape = convert.infer_shape(model_lib.build_model(None, **TINY).state_dict())
    assert shape == TINY
    with pytest.raises(convert.ConvertError, match="match no preset"):
        convert.resolve_model(shape)
    assert convert.resolve_model(shape, "pMF-L/16") == ("pMF-L/16", TINY)


def test_layouts_follow_the_torch_port():
    kernel = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # not a kernel rank: unchanged
    assert convert.to_torch_layout("net/pos_embed", kernel).shape == (2, 3, 4)
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)  # (in, out)
    assert torch.equal(convert.to_torch_layout("net/a/_flax_linear/kernel", dense), torch.from_numpy(dense).T)
    conv = np.random.default_rng(0).standard_normal((4, 5, 3, 7)).astype(np.float32)  # (kh, kw, in, out)
    ported = convert.to_torch_layout("net/x_embedder/proj1/kernel", conv)
    assert ported.shape == (7, 3, 4, 5) and ported[6, 2, 3, 4] == conv[3, 4, 2, 6]
    table = np.ones((1, 11, 8), np.float32)
    assert convert.to_torch_layout("net/y_embedder/embedding_table/embedding", table).shape == (11, 8)
    port = convert.torch_port_name
    assert port("net/h_embedder/mlp/layers_2/_flax_linear/kernel") == "h_embedder.mlp.2._flax_linear.weight"
    assert port("net/v_heads_1/attn/q_norm/kernel") == "v_heads.1.attn.q_norm.weight"
