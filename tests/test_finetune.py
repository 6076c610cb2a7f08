"""finetune.initial_weights (training.init_from): file layouts, class-count and resolution changes,
the v-head copied from the u-head of a release file, EMAs, and the errors."""
import pytest
import torch

import config as config_lib
import finetune
import model as model_lib
import pmf
import train
from test_model import _official_state_dict, _reference_forward

TINY = ["model.input_size=16", "model.in_channels=3", "model.num_classes=10", "model.depth=3",
        "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4", "model.head_depth=2",
        "perceptual.lpips=false", "perceptual.convnext=false", "training.global_batch_size=8",
        "training.micro_batch_size=8", "training.ema_half_lives_kimg=[0.01, 0.05]"]
TINY_SHAPE = dict(input_size=16, in_channels=3, num_classes=10, depth=3, hidden_size=32, num_heads=2,
                  patch_size=4, head_depth=2)


def make_cfg(*extra):
    return config_lib.load_config(None, [*TINY, *extra])


def fresh_run(cfg, seed=1):
    """The model and EMAs as a fresh train.py run builds them."""
    torch.manual_seed(seed)
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg))
    return net, train.EMA(net, cfg.training.ema_half_lives_kimg, cfg.training.ema_rampup)


def trained_like(net, seed=0):
    """Randomise every tensor, gates and final layers included, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net


def write_checkpoint(path, cfg, seed=0, emas=2):
    """A training checkpoint in train.py's layout (model, emas, ...) of a randomised model of `cfg`."""
    net = trained_like(model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg)), seed)
    ema_states = [trained_like(model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg)),
                               seed + 1 + i).state_dict() for i in range(emas)]
    torch.save({"step": 7, "model": net.state_dict(), "emas": ema_states, "ema_half_lives_kimg": [0.01, 0.05],
                "optimizer": {}, "config": config_lib.to_dict(cfg)}, path)
    return net.state_dict(), ema_states


def init(cfg, net, ema):
    lines = []
    finetune.initial_weights(cfg, net, ema, lines.append)
    return "\n".join(lines)


def train_one_step(cfg, net, ema):
    """One step of the real loss and optimizer on images of the model's shape; returns the loss."""
    method = config_lib.method_config(cfg)
    g = torch.Generator().manual_seed(0)
    b = cfg.training.global_batch_size
    x = torch.rand(b, net.in_channels, net.input_size, net.input_size, generator=g) * 2 - 1
    y = torch.arange(b) % method.num_classes
    draws = pmf.step_draws(method, range(b), b, x.shape[1:], cfg.training.seed, 0, "cpu")
    opt = train.build_optimizer(cfg, net)
    before = [p.detach().clone() for p in net.parameters()]
    loss, _ = pmf.pmf_loss(net, x, y, draws, method)
    loss.backward()
    opt.step()
    ema.update(net, 1, b)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    return loss


def assert_ema_is(ema, state):
    for name, p in zip(ema.names, ema.params[0]):
        assert torch.equal(p, state[name].float()), name


@pytest.mark.parametrize("classes", [13, 4])
def test_class_count_change_keeps_shared_rows_and_the_null_row_and_trains(tmp_path, classes):
    saved, _ = write_checkpoint(tmp_path / "src.pt", make_cfg())
    cfg = make_cfg(f"model.num_classes={classes}", f"training.init_from={tmp_path / 'src.pt'}")
    net, ema = fresh_run(cfg)
    fresh_table = net.label_embed.weight.detach().clone()
    log = init(cfg, net, ema)
    table, shared = net.label_embed.weight.detach(), min(classes, 10)
    assert table.shape == (classes + 1, 32)
    assert torch.equal(table[:shared], saved[finetune.LABELS][:shared])
    assert torch.equal(table[classes], saved[finetune.LABELS][10])  # null label -> null label
    assert torch.equal(table[shared:classes], fresh_table[shared:classes])
    for name, p in net.state_dict().items():
        if name != finetune.LABELS:
            assert torch.equal(p, saved[name]), name
    assert_ema_is(ema, net.state_dict())
    assert ("classes 10..12 get fresh rows" if classes > 10 else "classes 4..9 are dropped") in log
    train_one_step(cfg, net, ema)


def _grid_coordinates(grid, num_prefix, width):
    """A position embedding whose channel 0 is the row and channel 1 the column of each patch
    cell's centre, in units of the image side ((i + 0.5) / grid); prefix rows and other channels random."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    patches = torch.randn(grid, grid, width, dtype=torch.float64)
    patches[..., 0] = centres[:, None]
    patches[..., 1] = centres[None, :]
    return torch.cat([torch.randn(num_prefix, width, dtype=torch.float64), patches.reshape(grid * grid, width)])[None]


@pytest.mark.parametrize("size_from, size_to", [(32, 48), (48, 32)])
def test_resolution_change_resizes_the_patch_grid_keeps_the_prefix_and_trains(tmp_path, size_from, size_to):
    src_cfg = make_cfg(f"model.input_size={size_from}")
    saved, _ = write_checkpoint(tmp_path / "src.pt", src_cfg)
    grid_from, grid_to, prefix = size_from // 4, size_to // 4, 20
    saved[finetune.POSITIONS] = _grid_coordinates(grid_from, prefix, 32).float()
    torch.save({"model": saved, "config": config_lib.to_dict(src_cfg)}, tmp_path / "src.pt")
    cfg = make_cfg(f"model.input_size={size_to}", f"training.init_from={tmp_path / 'src.pt'}")
    net, ema = fresh_run(cfg)
    log = init(cfg, net, ema)

    pos = net.pos_embed.detach()[0]
    assert pos.shape == (prefix + grid_to ** 2, 32)
    assert torch.equal(pos[:prefix], saved[finetune.POSITIONS][0, :prefix])
    cells = pos[prefix:].reshape(grid_to, grid_to, 32).double()
    rows, cols = cells[..., 0], cells[..., 1]
    # Rows stay rows and columns columns: channel 0 (the row coordinate) is constant along each row
    # and increases down the grid; channel 1 likewise across.
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows), rtol=0, atol=1e-6)
    torch.testing.assert_close(cols, cols[:1, :].expand_as(cols), rtol=0, atol=1e-6)
    assert (rows[1:, 0] > rows[:-1, 0]).all() and (cols[0, 1:] > cols[0, :-1]).all()
    if grid_to > grid_from:
        # Upsampling with the Keys a = -0.5 cubic reproduces a linear function wherever its 4 taps
        # lie inside the source grid, with centres mapped onto centres.
        centres = (torch.arange(grid_to, dtype=torch.float64) + 0.5) / grid_to
        tap = (centres * grid_from - 0.5).floor()
        inside = ((tap >= 1) & (tap + 2 <= grid_from - 1)).nonzero().flatten()
        assert len(inside) >= 4
        torch.testing.assert_close(rows[inside, 0], centres[inside], rtol=0, atol=1e-6)
    for name, p in net.state_dict().items():
        if name != finetune.POSITIONS:
            assert torch.equal(p, saved[name]), name
    assert f"patch grid {grid_from}x{grid_from} -> {grid_to}x{grid_to}" in log
    train_one_step(cfg, net, ema)


def test_release_file_without_v_head_starts_v_head_as_u_head(tmp_path):
    release, blocks = _official_state_dict(TINY_SHAPE)  # authors' names, net. prefix, no v-head
    torch.save(release, tmp_path / "pMF-tiny.pt")
    cfg = make_cfg(f"training.init_from={tmp_path / 'pMF-tiny.pt'}")
    net, ema = fresh_run(cfg)
    log = init(cfg, net, ema)
    assert "copied from the u-head" in log
    state = net.state_dict()
    for name in state:
        if name.startswith(("v_head.", "v_final.")):
            u_name = name.replace("v_head.", "u_head.").replace("v_final.", "u_final.")
            assert torch.equal(state[name], state[u_name]), name
    assert_ema_is(ema, state)

    # The guidance queries (h = 0) of the v-head give the release model's u(z, t, t), computed by
    # the plain official forward on the file's own tensors.
    method = config_lib.method_config(cfg)
    g = torch.Generator().manual_seed(4)
    z, t = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, generator=g)
    omega, y, zeros, ones = 1 + 7 * torch.rand(3, generator=g), torch.tensor([2, 10, 7]), torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        u, v = pmf.velocities(net, z, t, zeros, omega, zeros, ones, y, method, heads="uv")
        x_ref = _reference_forward(release, blocks, TINY_SHAPE, z, zeros, omega, zeros, ones, y)
    u_ref = (z - x_ref) / t.clamp(method.t_clip, 1)[:, None, None, None]
    assert torch.equal(u, v)
    torch.testing.assert_close(v, u_ref, rtol=1e-4, atol=1e-4)
    train_one_step(cfg, net, ema)


def test_release_file_with_random_v_head_setting_keeps_the_fresh_v_head(tmp_path):
    torch.save(_official_state_dict(TINY_SHAPE)[0], tmp_path / "pMF-tiny.pt")
    cfg = make_cfg(f"training.init_from={tmp_path / 'pMF-tiny.pt'}", "training.init_v_head=random")
    net, ema = fresh_run(cfg)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    assert "kept fresh" in init(cfg, net, ema)
    state = net.state_dict()
    assert all(torch.equal(state[k], fresh[k]) for k in state if k.startswith(("v_head.", "v_final.")))
    assert not torch.equal(state["v_head.0.attn.q.weight"], state["u_head.0.attn.q.weight"])


def test_init_ema_takes_the_files_emas(tmp_path):
    saved, ema_states = write_checkpoint(tmp_path / "src.pt", make_cfg())
    cfg = make_cfg(f"training.init_from={tmp_path / 'src.pt'}", "training.init_ema=true")
    net, ema = fresh_run(cfg)
    log = init(cfg, net, ema)
    assert all(torch.equal(p, saved[n]) for n, p in net.state_dict().items())
    for params, state in zip(ema.params, ema_states):
        assert all(torch.equal(p, state[n]) for n, p in zip(ema.names, params))
    assert "its 2 EMAs" in log and "replaces the loaded EMAs" in log  # the default ramp-up
    with pytest.raises(config_lib.ConfigError, match="holds 2 EMAs.*lists 3"):
        cfg3 = make_cfg(f"training.init_from={tmp_path / 'src.pt'}", "training.init_ema=true",
                        "training.ema_half_lives_kimg=[0.01, 0.05, 0.1]")
        finetune.initial_weights(cfg3, *fresh_run(cfg3), lambda line: None)


@pytest.mark.parametrize("change, tensor", [
    ("model.hidden_size=64", "'class_tokens' of .* has shape \\(1, 8, 32\\), this model's is \\(1, 8, 64\\)"),
    ("model.in_channels=1", "'patch_embed.conv1.weight'"),
    ("model.patch_size=8", "'patch_embed.conv1.weight'"),
    ("model.depth=4", "has no tensor 'trunk.1.attn_gate'"),
    ("model.head_depth=1", "'u_head.1.attn_gate' of .* has no place"),
])
def test_a_different_model_shape_fails_naming_the_tensor(tmp_path, change, tensor):
    write_checkpoint(tmp_path / "src.pt", make_cfg())
    cfg = make_cfg(change, f"training.init_from={tmp_path / 'src.pt'}")
    with pytest.raises(finetune.FinetuneError, match=f"training.init_from: .*{tensor}"):
        init(cfg, *fresh_run(cfg))


def test_unusable_files_fail_with_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    torch.save(_official_state_dict(TINY_SHAPE)[0], tmp_path / "release.pt")
    cases = [("missing.pt", "not found"), ("junk.pt", "cannot read .* as a PyTorch checkpoint"),
             ("odd.pt", "neither a training checkpoint")]
    for name, message in cases:
        cfg = make_cfg(f"training.init_from={tmp_path / name}")
        with pytest.raises(config_lib.ConfigError, match=message) as err:
            init(cfg, *fresh_run(cfg))
        assert "\n" not in str(err.value)
    cfg = make_cfg(f"training.init_from={tmp_path / 'release.pt'}", "training.init_ema=true")
    with pytest.raises(finetune.FinetuneError, match="holds no EMAs"):
        init(cfg, *fresh_run(cfg))


def test_without_init_from_nothing_changes():
    cfg = make_cfg()
    net, ema = fresh_run(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert init(cfg, net, ema) == ""
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_train_py_starts_a_new_run_from_init_from(tmp_path):
    from test_train import load, run
    run(tmp_path / "source", "training.max_steps=2")
    source = load(tmp_path / "source", 2)["model"]
    assert run(tmp_path / "tuned", "training.max_steps=1", "model.num_classes=12",
               f"training.init_from={tmp_path / 'source' / 'ckpt-00000002.pt'}") == 1
    tuned = load(tmp_path / "tuned", 1)
    assert tuned["step"] == 1
    fresh = run(tmp_path / "fresh", "training.max_steps=1", "model.num_classes=12") and load(tmp_path / "fresh", 1)
    name = "trunk.0.attn.q.weight"
    assert (tuned["model"][name] - source[name]).norm() < 0.5 * (fresh["model"][name] - source[name]).norm()


def _step_on_fixed_grads(net, opt, seed):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_init_optimizer_continues_the_files_moments_at_this_configs_lr(tmp_path):
    source_cfg = make_cfg("optim.lr=0.001")
    net = trained_like(model_lib.build_model(source_cfg.model.name, **config_lib.model_overrides(source_cfg)))
    opt = train.build_optimizer(source_cfg, net)
    for seed in (1, 2):
        _step_on_fixed_grads(net, opt, seed)
    torch.save({"step": 2, "model": net.state_dict(), "emas": [net.state_dict()] * 2,
                "optimizer": opt.state_dict()}, tmp_path / "src.pt")
    cfg = make_cfg("optim.lr=0.004", f"training.init_from={tmp_path / 'src.pt'}", "training.init_optimizer=true")
    tuned, ema = fresh_run(cfg)
    tuned_opt = train.build_optimizer(cfg, tuned)
    lines = []
    finetune.initial_weights(cfg, tuned, ema, lines.append, opt=tuned_opt)
    assert "the file's optimizer moments" in lines[0]
    assert [g["lr"] for g in tuned_opt.param_groups] == [0.004, 0.004]
    for group in opt.param_groups:  # the reference: the source run's next step, at the new lr
        group["lr"] = 0.004
    _step_on_fixed_grads(net, opt, 3)
    _step_on_fixed_grads(tuned, tuned_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), tuned.parameters()))
    fresh, ema = fresh_run(cfg)
    fresh_opt = train.build_optimizer(cfg, fresh)
    finetune.initial_weights(make_cfg("optim.lr=0.004", f"training.init_from={tmp_path / 'src.pt'}"),
                             fresh, ema, lambda line: None, opt=fresh_opt)
    _step_on_fixed_grads(fresh, fresh_opt, 3)
    assert not torch.allclose(fresh.trunk[0].attn.q.weight, tuned.trunk[0].attn.q.weight)


@pytest.mark.parametrize("moments, extra, message", [
    (False, [], "holds no optimizer state"),
    (True, ["model.num_classes=12"], "its moments fit its own model shape only, and this run adapts it \\(label table"),
    (True, ["optim.partition=keller"], "has parameter groups of \\[\\d+, \\d+\\] tensors, this run's optimizer"),
])
def test_init_optimizer_needs_the_files_moments_and_shape(tmp_path, moments, extra, message):
    write_checkpoint(tmp_path / "src.pt", make_cfg())
    if moments:
        state = torch.load(tmp_path / "src.pt")
        net = model_lib.build_model(make_cfg().model.name, **config_lib.model_overrides(make_cfg()))
        state["optimizer"] = train.build_optimizer(make_cfg(), net).state_dict()
        torch.save(state, tmp_path / "src.pt")
    cfg = make_cfg(*extra, f"training.init_from={tmp_path / 'src.pt'}", "training.init_optimizer=true")
    net, ema = fresh_run(cfg)
    with pytest.raises(finetune.FinetuneError, match=f"training.init_optimizer: .*{message}"):
        finetune.initial_weights(cfg, net, ema, lambda line: None, opt=train.build_optimizer(cfg, net))
