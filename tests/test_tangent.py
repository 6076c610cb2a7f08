"""The single-pass tangent (model.py) and the fast du/dt (pmf.velocities_and_du_dt) against
torch.func.jvp through the simple path, per module type and for the whole model, in float64."""
import pytest
import torch

import model as model_lib
import pmf
from conftest import batch, flat_grads, tiny_cfg, tiny_model

D, HEADS, L, N = 32, 2, 20, 16  # width, heads, tokens, patch tokens (4 prefix tokens unrotated)


def _random_params(module, seed=0):
    """Randomise every parameter (gates, norm weights, zero-initialised layers) so that each
    term of the tangent contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _tokens(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


ROPE = model_lib.rope_tables(4, D // HEADS, torch.float64, "cpu")


def _norm():
    return model_lib.RMSNorm(D)


def _attention():
    return model_lib.Attention(D, HEADS)


def _block():
    return model_lib.Block(D, HEADS)


# (name, builder, call(module, x, dx, attn) -> (out, d_out), input shape)
MODULES = [
    ("rmsnorm", _norm, lambda m, x, dx, a: m(x, dx), (3, L, D)),
    ("qk_norm", lambda: model_lib.RMSNorm(D // HEADS), lambda m, x, dx, a: m(x, dx), (3, L, HEADS, D // HEADS)),
    ("scalar_embedder", lambda: model_lib.ScalarEmbedder(D), lambda m, x, dx, a: m(x, dx), (5,)),
    ("patch_embed", lambda: model_lib.PatchEmbed(4, 3, 8, D), lambda m, x, dx, a: m(x, dx), (2, 3, 16, 16)),
    ("swiglu", lambda: model_lib.SwiGLU(D), lambda m, x, dx, a: m(x, dx), (3, L, D)),
    ("attention_rope", _attention, lambda m, x, dx, a: m(x, ROPE, a, dx), (3, L, D)),
    ("gated_block", _block, lambda m, x, dx, a: m(x, ROPE, a, dx), (3, L, D)),
    ("final_layer", lambda: model_lib.FinalLayer(D, 4, 3), lambda m, x, dx, a: m(x, dx), (3, N, D)),
]


@pytest.mark.parametrize("name,build,call,shape", MODULES, ids=[m[0] for m in MODULES])
def test_module_tangent_equals_torch_func_jvp(name, build, call, shape, rel_err):
    module = _random_params(build().double())
    x, dx = _tokens(1, *shape), _tokens(2, *shape)
    if name == "scalar_embedder":
        x = x.sigmoid()  # the embedded scalars live in [0, 1]
    out, d_out = call(module, x, dx, "sdpa")
    ref_out, ref_d_out = torch.func.jvp(lambda a: call(module, a, None, "explicit")[0], (x,), (dx,))
    assert rel_err(out, ref_out) < 1e-12
    assert rel_err(d_out, ref_d_out) < 1e-9
    assert not d_out.requires_grad and out.requires_grad  # the tangent carries no graph
    assert call(module, x, None, "sdpa")[1] is None


def test_attention_tangent_identity_against_torch_func_jvp(rel_err):
    q, k, v, dq, dk, dv = (_tokens(s, 2, HEADS, L, 8) for s in range(6))
    ref = torch.func.jvp(lambda *a: model_lib.attention(*a, "explicit"), (q, k, v), (dq, dk, dv))[1]
    o = model_lib.attention(q, k, v, "explicit")
    assert rel_err(model_lib.attention_tangent(q, k, v, o, dq, dk, dv), ref) < 1e-9


def _conditioning(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(n, generator=g, dtype=torch.float64)
    omega = 1 + 7 * torch.rand(n, generator=g, dtype=torch.float64)
    t_min, t_max = 0.5 * torch.rand(n, generator=g, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    return h, omega, t_min, t_max


@pytest.mark.parametrize("prefix_tokens", [None, [1, 2, 1, 1, 3]])
def test_whole_model_tangent_equals_torch_func_jvp(prefix_tokens, rel_err):
    net = tiny_model(prefix_tokens=prefix_tokens)
    x, y = batch(6)
    h, omega, t_min, t_max = _conditioning(6)
    dz, dh = _tokens(4, *x.shape), torch.rand(6, dtype=torch.float64)

    def u_out(z_, h_):
        return net(z_, h_, omega, t_min, t_max, y, heads="u", attn="explicit")[0]

    ref_u, ref_du = torch.func.jvp(u_out, (x, h), (dz, dh))
    (u, v), du = net(x, h, omega, t_min, t_max, y, heads="uv", tangent=(dz, dh))
    assert rel_err(du, ref_du) < 1e-9
    assert torch.equal(u, net(x, h, omega, t_min, t_max, y, heads="u")[0])  # the primal is unchanged
    ref_h = torch.func.jvp(u_out, (x, h), (0 * dz, dh))[1]  # the time path alone
    assert ref_h.norm() > 1e-6 * ref_du.norm()
    assert rel_err(net(x, h, omega, t_min, t_max, y, heads="u", tangent=(0 * dz, dh))[1], ref_h) < 1e-9
    with pytest.raises(ValueError, match="include 'u' in heads"):
        net(x, h, omega, t_min, t_max, y, heads="v", tangent=(dz, dh))
    (u_rows, _), du_rows = net(x, h, omega, t_min, t_max, y, tangent=(dz[2:], dh[2:]))  # the last 4 rows only
    assert torch.equal(u_rows, u) and rel_err(du_rows, ref_du[2:]) < 1e-9
    for bad in ((dz[:0], dh[:0]), (dz[:, :2], dh), (dz, dh[1:])):
        with pytest.raises(ValueError, match="tangent must be"):
            net(x, h, omega, t_min, t_max, y, tangent=bad)


@pytest.mark.parametrize("prediction", ["x", "u"])
def test_fast_du_dt_equals_simple_path_with_and_without_t_clip(prediction, rel_err):
    cfg = tiny_cfg(prediction=prediction)
    net = tiny_model()
    x, y = batch(6)
    t = torch.tensor([0.9, 0.5, 0.2, 0.05, 0.03, 0.01], dtype=torch.float64)  # 0.05: on the clip's bound
    r = t * torch.tensor([0.0, 0.3, 0.5, 0.9, 0.5, 0.0], dtype=torch.float64)
    _, omega, t_min, t_max = _conditioning(6)
    z, tangent = _tokens(5, *x.shape), _tokens(6, *x.shape)
    simple = pmf.du_dt_jvp(net, z, t, r, omega, t_min, t_max, y, tangent, cfg)
    u, v, fast = pmf.velocities_and_du_dt(net, z, t, r, omega, t_min, t_max, y, tangent, cfg)
    clipped = t <= cfg.t_clip
    assert rel_err(fast[~clipped], simple[~clipped]) < 1e-9
    assert rel_err(fast[clipped], simple[clipped]) < 1e-9
    ref_u, ref_v = pmf.velocities(net, z, t, t - r, omega, t_min, t_max, y, cfg)
    assert torch.equal(u, ref_u) and torch.equal(v, ref_v) and not fast.requires_grad
    if prediction == "x":  # the test can fail: dropping the clip's derivative changes unclipped rows
        no_clip = tiny_cfg(prediction=prediction, t_clip=0.0)
        wrong = pmf.velocities_and_du_dt(net, z, t, r, omega, t_min, t_max, y, tangent, no_clip)[2]
        assert rel_err(wrong[clipped], simple[clipped]) > 1e-3


def test_fast_du_dt_skips_the_r_equals_t_prefix(rel_err):
    cfg, net = tiny_cfg(), tiny_model()
    x, y = batch(6)
    t = torch.tensor([0.9, 0.4, 0.7, 0.5, 0.3, 0.6], dtype=torch.float64)
    _, omega, t_min, t_max = _conditioning(6)
    z, tangent = _tokens(5, *x.shape), _tokens(6, *x.shape)
    for r in (torch.cat([t[:3], 0.5 * t[3:]]), t.clone()):  # an r = t prefix of 3 rows; all rows r = t
        simple = pmf.du_dt_jvp(net, z, t, r, omega, t_min, t_max, y, tangent, cfg)
        u, v, fast = pmf.velocities_and_du_dt(net, z, t, r, omega, t_min, t_max, y, tangent, cfg)
        moving = t != r
        assert (fast[~moving] == 0).all() and simple[~moving].abs().max() > 0
        assert not moving.any() or rel_err(fast[moving], simple[moving]) < 1e-9
        assert torch.equal(u, pmf.velocities(net, z, t, t - r, omega, t_min, t_max, y, cfg)[0])


@pytest.mark.parametrize("mode,prediction", [("prefix", "x"), ("per_sample", "x"), ("prefix", "u")])
def test_fast_path_gradients_equal_simple_path(mode, prediction, rel_err):
    net = tiny_model()
    x, y = batch(8)
    draws = pmf.sample_draws(tiny_cfg(), x, torch.Generator().manual_seed(7))
    draws.t[-1], draws.r[-1] = 0.03, 0.01  # a t-clipped r < t row
    draws.drop = torch.arange(8) % 3 == 1 if mode == "per_sample" else torch.arange(8) < 2
    grads = {}
    for path in ("fast", "simple"):
        cfg = tiny_cfg(class_dropout_mode=mode, prediction=prediction, jvp=path)
        loss, metrics = pmf.pmf_loss(net, x, y, draws, cfg)
        grads[path] = (loss.item(), metrics["du_dt_norm"].item(), flat_grads(net, loss))
    assert abs(grads["fast"][0] - grads["simple"][0]) < 1e-12
    assert abs(grads["fast"][1] - grads["simple"][1]) < 1e-9 * grads["simple"][1]
    assert rel_err(grads["fast"][2], grads["simple"][2]) < 1e-9


def test_bf16_autocast_tangent_is_close_to_float64():
    net64 = tiny_model()
    net32 = tiny_model().float()
    cfg = tiny_cfg()
    x, y = batch(8)
    t = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    r = 0.5 * t
    _, omega, t_min, t_max = _conditioning(8)
    z, tangent = _tokens(5, *x.shape), _tokens(6, *x.shape)
    ref = pmf.du_dt_jvp(net64, z, t, r, omega, t_min, t_max, y, tangent, cfg)
    args = [a.float() for a in (z, t, r, omega, t_min, t_max)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = pmf.velocities_and_du_dt(net32, *args, y, tangent.float(), cfg)[2]
    err = ((fast.double() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(fast).all() and err < 2e-2
    assert err > 1e-5  # bf16 really was used


def test_fp16_autocast_tangent_runs_in_fp32():
    """Under fp16 autocast the tangent leaves autocast (model._tangent_mode): a du/dt far beyond
    fp16's range (65504) stays finite and accurate to fp16 rounding of the primal only."""
    net64, net32, cfg = tiny_model(), tiny_model().float(), tiny_cfg()
    x, y = batch(8)
    t = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    _, omega, t_min, t_max = _conditioning(8)
    z, tangent = _tokens(5, *x.shape), 1e4 * _tokens(6, *x.shape)
    ref = pmf.du_dt_jvp(net64, z, t, 0.5 * t, omega, t_min, t_max, y, tangent, cfg)
    args = [a.float() for a in (z, t, 0.5 * t, omega, t_min, t_max)]
    with torch.autocast("cpu", dtype=torch.float16):
        fast = pmf.velocities_and_du_dt(net32, *args, y, tangent.float(), cfg)[2]
    assert ref.abs().max() > 65504 and torch.isfinite(fast).all()
    assert ((fast.double() - ref).norm() / ref.norm()).item() < 1e-3
