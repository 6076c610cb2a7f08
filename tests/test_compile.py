"""training.compile: the compiled network (pmf.compile_model) against the eager one, the number
of graphs a run compiles, DDP around it, the rejected combination with method.jvp=simple, and the
compiled samplers (eval.py --compile, train.py's sample grids) against eager ones.

CPU inductor compiles take tens of seconds; the graph count uses the cheaper aot_eager backend
(the same Dynamo capture and AOTAutograd split as inductor, eager kernels)."""
import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.backends.registry import lookup_backend

import config
import eval as ev
import pmf
from conftest import batch, flat_grads, tiny_cfg, tiny_model
from launch import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(**overrides):
    """An eager float32 tiny model (v-head recomputed, the training default) and a compiled copy."""
    eager = tiny_model(dtype=torch.float32, recompute_v_head=True, **overrides)
    return eager, copy.deepcopy(eager)


def test_compile_setting_resolution_and_the_simple_jvp_refusal():
    assert pmf.compile_wanted(None, "fast", "cuda") and not pmf.compile_wanted(None, "fast", "cpu")
    assert not pmf.compile_wanted(None, "simple", "cuda") and pmf.compile_wanted(True, "fast", "cpu")
    with pytest.raises(config.ConfigError, match="training.compile=true needs method.jvp=fast"):
        config.load_config("config.yaml", ["training.compile=true", "method.jvp=simple"])
    assert config.load_config("config.yaml", ["training.compile=false", "method.jvp=simple"]).training.compile is False
    net = pmf.compile_model(tiny_model(dtype=torch.float32), backend="eager")  # lazy: nothing compiled yet
    x, y = batch(4, dtype=torch.float32)
    cfg = tiny_cfg(jvp="simple")
    with pytest.raises(ValueError, match="method.jvp=simple needs an eager network"):
        pmf.pmf_loss(net, x, y, pmf.sample_draws(cfg, x, torch.Generator().manual_seed(0)), cfg)


def test_fifty_steps_with_fresh_draws_compile_three_graphs():
    """The guidance query (v-head, no grad) compiles static, then once with a symbolic batch when
    its row count first changes; the training forward (both heads, tangent on the fixed r < t
    rows) once. Nothing recompiles after that: 3 graphs in 50 steps."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(example_inputs))
        return lookup_backend("aot_eager")(gm, example_inputs)

    net = pmf.compile_model(tiny_model(dtype=torch.float32, recompute_v_head=True), backend=counting)
    cfg = tiny_cfg()
    x, y = batch(8, dtype=torch.float32)
    sizes, after_warmup = set(), None
    for step in range(50):
        d = pmf.step_draws(cfg, range(8), 8, x.shape[1:], 0, step, "cpu")
        inside = (d.t_min <= d.t) & (d.t <= d.t_max)
        sizes.add(int((inside & ~d.drop).sum()))  # the guidance's v_u rows; its v_c rows are the 4 r < t rows
        pmf.pmf_loss(net, x, y, d, cfg)[0].backward()
        if step == 2:
            after_warmup = len(graphs)
    assert len(sizes) >= 3  # the draws really changed the guidance shape
    assert len(graphs) == after_warmup == 3, graphs
    assert torch._dynamo.utils.counters["graph_break"] == {}


@pytest.mark.slow  # an inductor compile of forward + backward: minutes on 2 loaded cores
def test_inductor_loss_du_dt_and_gradients_equal_eager(rel_err):
    eager, compiled = _pair()
    pmf.compile_model(compiled)
    cfg = tiny_cfg()
    x, y = batch(8, dtype=torch.float32)
    d = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(3))
    results = {}
    for name, net in (("eager", eager), ("compiled", compiled)):
        loss, metrics = pmf.pmf_loss(net, x, y, d, cfg)
        z = (1 - d.t[:, None, None, None]) * x + d.t[:, None, None, None] * d.e
        with torch.no_grad():
            du_dt = pmf.velocities_and_du_dt(net, z, d.t, d.r, d.omega, d.t_min, d.t_max, y, d.e - x, cfg)[2]
        results[name] = (loss.item(), metrics["mse_v"].item(), du_dt, flat_grads(net, loss))
    (loss_e, mse_e, du_e, grad_e), (loss_c, mse_c, du_c, grad_c) = results["eager"], results["compiled"]
    print(f"compiled vs eager: loss {abs(loss_c - loss_e):.2e}, du/dt {rel_err(du_c, du_e):.2e}, "
          f"grads {rel_err(grad_c, grad_e):.2e} (relative)")
    assert abs(loss_c - loss_e) < 1e-5 and abs(mse_c - mse_e) < 1e-5 * mse_e
    assert rel_err(du_c, du_e) < 1e-5 and rel_err(grad_c, grad_e) < 1e-5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_compiled_step_under_autocast_equals_eager(precision, rel_err):
    """bf16 autocast, and fp16 with the GradScaler (the tangent leaves fp16 autocast inside the graph)."""
    eager, compiled = _pair()
    pmf.compile_model(compiled, backend="aot_eager")
    cfg = tiny_cfg()
    x, y = batch(8, dtype=torch.float32)
    d = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(4))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    out = {}
    for name, net in (("eager", eager), ("compiled", compiled)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=precision == "fp16")
        with torch.autocast("cpu", dtype=dtype):
            loss, metrics = pmf.pmf_loss(net, x, y, d, cfg)
        net.zero_grad()
        scaler.scale(loss).backward()
        out[name] = (loss.item(), metrics["du_dt_norm"].item(), torch.cat([p.grad.flatten() for p in net.parameters()]))
    (loss_e, du_e, g_e), (loss_c, du_c, g_c) = out["eager"], out["compiled"]
    assert torch.isfinite(g_c).all()
    assert abs(loss_c - loss_e) < 1e-2 and abs(du_c - du_e) < 1e-2 * du_e and rel_err(g_c, g_e) < 5e-2


@pytest.mark.slow  # two processes compiling (inductor: minutes)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_two_process_ddp_around_the_compiled_network_equals_eager(backend, tmp_path, rel_err):
    out = tmp_path / "grads.pt"
    torchrun(os.path.join(HERE, "compile_ddp_worker.py"), out, backend, timeout=900)
    ddp = torch.load(out, weights_only=True)
    net, cfg = tiny_model(dtype=torch.float32, recompute_v_head=True), tiny_cfg()
    x, y = batch(8, dtype=torch.float32)
    for rank, (xr, yr) in enumerate(zip(x.chunk(2), y.chunk(2))):
        draws = pmf.sample_draws(cfg, xr, torch.Generator().manual_seed(100 + rank))
        loss, metrics = pmf.pmf_loss(net, xr, yr, draws, cfg)
        (loss / 2).backward()
        if rank == 0:
            loss_0, du_dt_0 = loss.item(), metrics["du_dt_norm"].item()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    ddp_grads = torch.cat([ddp["grads"][n].flatten() for n, _ in net.named_parameters()])
    print(f"DDP compiled vs eager: loss {abs(ddp['loss'].item() - loss_0):.2e}, "
          f"du/dt norm {abs(ddp['du_dt_norm'].item() - du_dt_0) / du_dt_0:.2e}, grads {rel_err(ddp_grads, grads):.2e}")
    assert abs(ddp["loss"].item() - loss_0) < 1e-5 and abs(ddp["du_dt_norm"].item() - du_dt_0) < 1e-5 * du_dt_0
    assert rel_err(ddp_grads, grads) < 1e-5


@pytest.mark.slow  # an inductor compile of the inference forward
def test_compiled_sampler_writes_the_same_images(tmp_path):
    eager, compiled = _pair(with_v_head=False)
    pmf.compile_model(compiled)
    cfg = tiny_cfg()
    images = {}
    for name, net in (("eager", eager), ("compiled", compiled)):
        out_dir = str(tmp_path / name)
        os.makedirs(out_dir)
        ev.generate(net, cfg, out_dir, list(range(8)), 8, 4, 3.0, 0.1, 0.8, 1, 42)
        images[name] = ev.load_pngs(out_dir, 8)
    assert np.array_equal(images["eager"], images["compiled"])


def _fresh_dynamo():
    """Dynamo's caches and counters emptied (reset() keeps the counters)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def _unique_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_eval_compile_flag_writes_the_eager_pngs(tmp_path):
    """eval.py --compile against --no-compile on one checkpoint: byte-identical PNGs (uint8 rounding
    of both), and only --compile captured a graph."""
    import train
    from test_train import tiny
    train.train(config.load_config(None, tiny(tmp_path / "run")))
    common = ["--ckpt", str(tmp_path / "run" / "ckpt-00000004.pt"), "--num-samples", "8", "--batch-size", "4",
              "--no-metrics", "--omega", "2", "--t-min", "0", "--t-max", "1"]
    pngs, graphs = {}, {}
    for flag in ("--no-compile", "--compile"):
        _fresh_dynamo()
        ev.main(common + [flag, "--out-dir", str(tmp_path / flag)])
        [run_dir] = [os.path.join(tmp_path / flag, d) for d in os.listdir(tmp_path / flag)]
        pngs[flag], graphs[flag] = ev.load_pngs(run_dir, 8), _unique_graphs()
    differing = int((pngs["--compile"] != pngs["--no-compile"]).sum())
    print(f"eval --compile vs --no-compile: {differing} of {pngs['--compile'].size} uint8 values differ; "
          f"graphs {graphs}")
    assert graphs == {"--no-compile": 0, "--compile": 1}
    assert differing == 0


def test_training_sample_grids_compile_once_and_match_eager(tmp_path):
    """train.py's sample grids with training.compile=true: two grids from different EMA weights
    capture one graph (the network is built once, weights loaded in place), and each grid's PNG is
    the eager network's."""
    import train
    from test_train import tiny
    grids = {}
    states = [tiny_model(dtype=torch.float32, seed=s, with_v_head=False).state_dict() for s in (1, 2)]
    for setting in ("false", "true"):
        _fresh_dynamo()
        cfg = config.load_config(None, tiny(tmp_path, f"training.compile={setting}"))
        method = config.method_config(cfg)
        net = train.sampling_network(cfg, method, torch.device("cpu"))
        for k, state in enumerate(states):
            path = tmp_path / f"{setting}-{k}.png"
            train.save_samples(str(path), net, state, cfg, method, torch.device("cpu"))
            grids[setting, k] = np.array(Image.open(path))
        grids[setting, "graphs"] = _unique_graphs()
    print(f"sample grids compiled vs eager: graphs {grids['true', 'graphs']} and {grids['false', 'graphs']}, "
          f"differing values {[int((grids['true', k] != grids['false', k]).sum()) for k in (0, 1)]}")
    assert grids["true", "graphs"] == 1 and grids["false", "graphs"] == 0
    assert not np.array_equal(grids["false", 0], grids["false", 1])  # the weights really changed
    assert all(np.array_equal(grids["true", k], grids["false", k]) for k in (0, 1))
