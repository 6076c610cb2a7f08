"""pmf.py: the training objective against independent references, the samplers, sampling."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import pmf
from conftest import batch, flat_grads, tiny_cfg, tiny_model

NULL = 10


def _col(s):
    return s.view(-1, 1, 1, 1)


def _draws(cfg, x, seed=0, **edits):
    """Draws with hand-placed rows: one with the t-clip active, one outside its CFG interval."""
    d = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(seed))
    n = x.shape[0]
    d.t[n - 1], d.r[n - 1] = 0.03, 0.01          # r < t row with t < 0.05 (clip active)
    d.t[n - 2], d.t_max[n - 2] = 0.95, 0.8        # r < t row outside its interval
    d.t_min[n - 3] = d.t[n - 3]                   # interval bound hit exactly (inclusive)
    for name, value in edits.items():
        setattr(d, name, value)
    d.e = cfg.noise_scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    return d


def _reference_loss(net, x, y, d, cfg):
    """A deliberately plain pMF loss: the official unpruned guidance (two full v-head calls),
    grad-mode torch.func.jvp on the undistributed model with explicit attention, the formula
    written out term by term (docs/method.md §2)."""
    c = lambda t: _col(t.clamp(0.05, 1.0))

    def vel(z, t, h, w, lo, hi, yy, heads, attn="explicit"):
        outs = net(z, h, w, lo, hi, yy, heads=heads, attn=attn)
        return [o if cfg.prediction == "u" else (z - o) / c(t) for o in outs]

    t, r, w = d.t, d.r, d.omega
    n = len(t)
    zero, one, null = torch.zeros_like(t), torch.ones_like(t), torch.full_like(y, NULL)
    z = (1 - _col(t)) * x + _col(t) * d.e
    v_t = (z - x) / c(t)
    with torch.no_grad():
        both = vel(torch.cat([z, z]), torch.cat([t, t]), torch.cat([zero, zero]), torch.cat([w, one]),
                   torch.cat([zero, zero]), torch.cat([one, one]), torch.cat([y, null]), "v")[0]
        v_c1, v_u = both[:n], both[n:]
        w_in = torch.where((t >= d.t_min) & (t <= d.t_max), w, one)
        v_c = vel(z, t, zero, w_in, zero, one, y, "v")[0]
        v_g = torch.where(_col(d.fm), v_t + _col(1 - 1 / w) * (v_c1 - v_u), v_t + _col(1 - 1 / w_in) * (v_c - v_u))
    y_in = torch.where(d.drop, null, y)
    v_g = torch.where(_col(d.drop), v_t, v_g)
    tangent = v_c if cfg.class_dropout_mode == "prefix" else torch.where(_col(d.drop), v_u, v_c)

    def F(z_, t_, r_):
        u, v = vel(z_, t_, t_ - r_, w, d.t_min, d.t_max, y_in, "uv")
        return u, v

    u, du_dt, v = torch.func.jvp(F, (z, t, r), (tangent, one, zero), has_aux=True)
    V = u + _col(t - r) * du_dt.detach()
    A = lambda L: L / (L + 0.01).detach()
    L_u = A(((V - v_g) ** 2).sum((1, 2, 3)))
    L_v = A(((v - v_g) ** 2).sum((1, 2, 3)))
    return (L_u + L_v).mean(), du_dt


@pytest.mark.parametrize("mode,prediction", [("prefix", "x"), ("per_sample", "x"), ("prefix", "u")])
def test_loss_gradients_equal_plain_reference(mode, prediction, rel_err):
    cfg = tiny_cfg(class_dropout_mode=mode, prediction=prediction)
    net = tiny_model()
    x, y = batch(8)
    drop = torch.zeros(8, dtype=torch.bool)
    drop[[0, 1] if mode == "prefix" else [1, 6]] = True       # row 6 is an r < t row
    d = _draws(cfg, x, drop=drop)
    loss, _ = pmf.pmf_loss(net, x, y, d, cfg)
    ours = flat_grads(net, loss)
    ref_loss, _ = _reference_loss(net, x, y, d, cfg)
    ref = flat_grads(net, ref_loss)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert rel_err(ours, ref) < 1e-8
    if mode == "per_sample":  # the test can fail: the official tangent on dropped r<t rows differs
        wrong, _ = _reference_loss(net, x, y, d, tiny_cfg(class_dropout_mode="prefix", prediction=prediction))
        assert rel_err(ours, flat_grads(net, wrong)) > 1e-6


def test_du_dt_equals_central_finite_differences(rel_err):
    cfg = tiny_cfg()
    net = tiny_model()
    x, y = batch(8)
    d = _draws(cfg, x)
    z = (1 - _col(d.t)) * x + _col(d.t) * d.e
    v_c, v_u, _ = pmf.guidance_velocities(net, z, d.t, y, d.drop, d.omega, d.t_min, d.t_max, cfg)
    v_c = pmf.jvp_tangent(v_c, v_u, d.drop, cfg)
    du_dt = pmf.du_dt_jvp(net, z, d.t, d.r, d.omega, d.t_min, d.t_max, y, v_c, cfg)

    def u(eps):
        t = d.t + eps
        return pmf.velocities(net, z + eps * v_c, t, t - d.r, d.omega, d.t_min, d.t_max, y, cfg, heads="u")[0]

    eps = 1e-6
    fd = (u(eps) - u(-eps)) / (2 * eps)
    assert rel_err(du_dt, fd) < 1e-6
    assert rel_err(du_dt[-1:], fd[-1:]) < 1e-6  # the row with the t-clip active (t = 0.03)
    # the t-tangent's path through 1/c(t) matters: without it the error is large
    no_clip_path = fd + _col((d.t >= 0.05).double() / d.t.clamp(0.05, 1)) * pmf.velocities(
        net, z, d.t, d.t - d.r, d.omega, d.t_min, d.t_max, y, cfg, heads="u")[0]
    assert rel_err(du_dt, no_clip_path) > 1e-3


def test_training_path_uses_the_jvp_of_the_dropped_labels(rel_err):
    """The du/dt inside pmf_loss (its logged norm) equals the plain reference's du/dt."""
    cfg = tiny_cfg()
    net = tiny_model()
    x, y = batch(8)
    d = _draws(cfg, x, drop=torch.arange(8) < 2)
    _, metrics = pmf.pmf_loss(net, x, y, d, cfg)
    _, ref_du_dt = _reference_loss(net, x, y, d, cfg)
    expected = ref_du_dt[~d.fm].flatten(1).norm(dim=1).mean()  # the metric covers r < t rows
    assert abs(metrics["du_dt_norm"].item() - expected.item()) / expected.item() < 1e-10


@pytest.mark.parametrize("mode", pmf.DROPOUT_MODES)
def test_reused_v_c_gives_the_loss_of_querying_it(mode, monkeypatch, rel_err):
    """v_c on the kept r = t rows from the training forward (fast path) against querying it there:
    the raw v-MSE (the loss itself is ~2 with both adaptive weights near 1), du/dt, the gradients."""
    cfg = tiny_cfg(class_dropout_mode=mode)
    net = tiny_model()
    x, y = batch(8)
    d = _draws(cfg, x, drop=torch.arange(8) < 1 if mode == "prefix" else torch.arange(8) % 3 == 1)
    real = pmf.reused_v_c_rows
    assert real(d.t, d.r, d.t_min, d.t_max, d.drop).sum() >= 2

    def loss_and_grads(rows):
        monkeypatch.setattr(pmf, "reused_v_c_rows", rows)
        loss, metrics = pmf.pmf_loss(net, x, y, d, cfg)
        return metrics["mse_v"].item(), metrics["du_dt_norm"].item(), flat_grads(net, loss)

    ours = loss_and_grads(real)
    queried = loss_and_grads(lambda *a: torch.zeros_like(real(*a)))
    assert abs(ours[0] - queried[0]) < 1e-12 * queried[0] and abs(ours[1] - queried[1]) < 1e-12 * queried[1]
    assert rel_err(ours[2], queried[2]) < 1e-12
    # the test can fail: v from r < t rows (h = t - r, their own interval) is not v_c
    wrong = loss_and_grads(lambda t, r, lo, hi, drop: ~drop)
    assert rel_err(wrong[2], queried[2]) > 1e-6


# ---- samplers (docs/method.md §2.1-2.4) ----

N = 40000


def _like():
    return torch.empty(0, dtype=torch.float64)


def test_time_sampler_prefix_order_and_logit_normal_moments():
    cfg = tiny_cfg()
    t, r, fm = pmf.sample_time(cfg, N, _like(), torch.Generator().manual_seed(0))
    assert fm.sum() == N // 2 and fm[: N // 2].all()
    assert (t >= r).all() and torch.equal(t[fm], r[fm]) and (t[~fm] > r[~fm]).all()
    logit = lambda p: torch.log(p / (1 - p))
    assert logit(t[fm]).mean().item() == pytest.approx(0.8, abs=0.02)
    assert logit(t[fm]).std().item() == pytest.approx(0.8, abs=0.02)
    # max/min of two N(0.8, 0.8) draws: mean 0.8 +- 0.8/sqrt(pi) (ordering after the prefix)
    assert logit(t[~fm]).mean().item() == pytest.approx(0.8 + 0.8 / math.sqrt(math.pi), abs=0.02)
    assert logit(r[~fm]).mean().item() == pytest.approx(0.8 - 0.8 / math.sqrt(math.pi), abs=0.02)


def test_time_sampler_uniform_mix():
    cfg = tiny_cfg(tr_uniform=1.0)
    t, r, fm = pmf.sample_time(cfg, N, _like(), torch.Generator().manual_seed(1))
    assert stats.kstest(t[fm].numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest(t[~fm].numpy(), lambda s: s ** 2).pvalue > 1e-3      # max of two uniforms
    cfg = tiny_cfg(tr_uniform=0.1)
    t, _, fm = pmf.sample_time(cfg, N, _like(), torch.Generator().manual_seed(2))
    # P(t_fm < 0.3): 0.9 * logit-normal CDF + 0.1 * 0.3
    expected = 0.9 * stats.norm.cdf((math.log(0.3 / 0.7) - 0.8) / 0.8) + 0.1 * 0.3
    assert (t[fm] < 0.3).double().mean().item() == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_omega_density_is_power_law_on_1_to_8(beta):
    omega = pmf.sample_omega(tiny_cfg(cfg_beta=beta), N, _like(), torch.Generator().manual_seed(3))
    assert omega.min() >= 1 and omega.max() <= 8
    if beta == 1.0:
        cdf = lambda w: np.log(w) / np.log(8)
    else:
        cdf = lambda w: (1 - 1 / w) / (1 - 1 / 8)
    assert stats.kstest(omega.numpy(), cdf).pvalue > 1e-3


def test_cfg_interval_ranges():
    x = torch.zeros(N, 3, 1, 1, dtype=torch.float64)
    d = pmf.sample_draws(tiny_cfg(), x, torch.Generator().manual_seed(4))
    assert (d.t_min[d.fm] == 0).all() and (d.t_max[d.fm] == 1).all()
    lo, hi = d.t_min[~d.fm], d.t_max[~d.fm]
    assert stats.kstest((2 * lo).numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest((2 * hi - 1).numpy(), "uniform").pvalue > 1e-3


def test_class_dropout_prefix_and_per_sample():
    like = _like()
    counts = []
    for seed in range(400):
        drop = pmf.sample_dropout(tiny_cfg(), 64, like, torch.Generator().manual_seed(seed))
        k = int(drop.sum())
        assert drop[:k].all() and not drop[k:].any()  # official: the first k rows
        counts.append(k)
    assert sum(counts) / len(counts) == pytest.approx(6.4, abs=0.4)
    drop = pmf.sample_dropout(tiny_cfg(class_dropout_mode="per_sample"), N, like, torch.Generator().manual_seed(5))
    assert drop.double().mean().item() == pytest.approx(0.1, abs=0.01)
    assert drop[N // 2:].double().mean().item() == pytest.approx(0.1, abs=0.01)  # r < t rows too


# ---- the guided target on hand-made inputs ----

class _Stub(torch.nn.Module):
    """x_hat = 0.5 z + (y + 10 omega): velocities are known in closed form; calls are recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, h, omega, t_min, t_max, y, heads="uv", attn="sdpa", tangent=None):
        self.calls.append(dict(n=len(z), h=h, omega=omega, t_min=t_min, t_max=t_max, y=y, heads=heads))
        out = 0.5 * z + _col(y.to(z.dtype) + 10 * omega)
        outs = tuple(out for _ in heads)
        return outs if tangent is None else (outs, 0.5 * tangent[0])


def _hand_made_rows(mode):
    """Six rows: r = t rows 0-1 (interval [0, 1], row 1 dropped), r < t rows 2-5 (3 on its interval's
    lower bound, 2, 4, 5 outside it, 4 dropped), with closed-form velocities from `_Stub`."""
    t = torch.tensor([0.5, 0.02, 0.9, 0.3, 0.3, 0.7], dtype=torch.float64)
    r = torch.tensor([0.5, 0.02, 0.1, 0.2, 0.1, 0.3], dtype=torch.float64)
    t_min = torch.tensor([0.0, 0.0, 0.1, 0.3, 0.4, 0.2], dtype=torch.float64)   # row 3: t == t_min (inside)
    t_max = torch.tensor([1.0, 1.0, 0.8, 0.6, 0.6, 0.6], dtype=torch.float64)   # rows 2, 4, 5 outside
    omega = torch.tensor([2.0, 4.0, 3.0, 5.0, 8.0, 6.0], dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    drop = torch.tensor([False, True, False, False, True, False])              # one inside, one outside
    if mode == "prefix":
        drop = torch.tensor([False, True, False, False, False, False])
    z = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    return t, r, t_min, t_max, omega, y, drop, z


@pytest.mark.parametrize("mode", pmf.DROPOUT_MODES)
@pytest.mark.parametrize("schedule", ["simple", "fast"])
def test_guidance_on_hand_made_inputs(mode, schedule):
    """Target and tangent against closed forms; the one v-head call queries only the rows used:
    under the fast schedule no tangent on the r = t prefix, and no v_c on its kept rows (reused)."""
    cfg = tiny_cfg(class_dropout_mode=mode)
    stub = _Stub()
    t, r, t_min, t_max, omega, y, drop, z = _hand_made_rows(mode)
    v_t = torch.randn_like(z)
    c = _col(t.clamp(0.05, 1))
    vel = lambda w, label: (z - (0.5 * z + _col(label.double() + 10 * w))) / c
    inside = torch.tensor([True, True, False, True, False, False])
    w_in = torch.where(inside, omega, torch.ones_like(omega))
    v_c, v_u = vel(w_in, y), vel(torch.ones(6), torch.full((6,), NULL))
    fast = schedule == "fast"
    tangent_rows = torch.arange(6) >= 2 if fast else None
    reused = pmf.reused_v_c_rows(t, r, t_min, t_max, drop) if fast else None
    got_c, got_u, got_w = pmf.guidance_velocities(stub, z, t, y, drop, omega, t_min, t_max, cfg, tangent_rows, reused)
    if fast:
        assert reused.tolist() == [True, False, False, False, False, False]
        got_c = torch.where(_col(reused), v_c, got_c)  # pmf_loss fills them from the training forward
    expected = torch.where(_col(inside & ~drop), v_t + _col(1 - 1 / omega) * (v_c - v_u), v_t)
    torch.testing.assert_close(pmf.guided_target(v_t, got_c, got_u, got_w, drop), expected, rtol=0, atol=1e-12)
    per_sample = mode == "per_sample"
    moving = slice(2 if fast else 0, None)
    tangent = pmf.jvp_tangent(got_c, got_u, drop, cfg)
    expected = torch.where(_col(drop), v_u, v_c) if per_sample else v_c
    torch.testing.assert_close(tangent[moving], expected[moving], rtol=0, atol=1e-12)
    call, = stub.calls
    cond = {("simple", "prefix"): [0, 1, 2, 3, 4, 5], ("simple", "per_sample"): [0, 2, 3, 5],
            ("fast", "prefix"): [2, 3, 4, 5], ("fast", "per_sample"): [2, 3, 5]}[schedule, mode]
    uncond = {("simple", "prefix"): [0, 3], ("simple", "per_sample"): [0, 1, 3, 4],
              ("fast", "prefix"): [0, 3], ("fast", "per_sample"): [0, 3, 4]}[schedule, mode]
    assert call["n"] == len(cond) + len(uncond) and call["heads"] == "v"
    assert (call["h"] == 0).all() and (call["t_min"] == 0).all() and (call["t_max"] == 1).all()
    assert torch.equal(call["y"], torch.cat([y[cond], torch.full((len(uncond),), NULL)]))
    assert torch.equal(call["omega"], torch.cat([w_in[cond], torch.ones(len(uncond), dtype=torch.float64)]))


def test_dropped_rows_get_null_label_and_unguided_target():
    cfg = tiny_cfg()
    stub = _Stub()
    x, y = batch(6)
    d = _draws(cfg, x, drop=torch.tensor([True, True, False, False, False, False]))
    pmf.pmf_loss(stub, x, y, d, cfg)
    grad_call = stub.calls[-1]
    assert grad_call["heads"] == "uv"
    assert torch.equal(grad_call["y"], torch.where(d.drop, NULL, y))
    assert torch.equal(grad_call["omega"], d.omega) and torch.equal(grad_call["t_min"], d.t_min)


def test_metrics_report_raw_terms_and_t_buckets():
    cfg = tiny_cfg()
    net = tiny_model()
    x, y = batch(8)
    d = _draws(cfg, x)
    _, m = pmf.pmf_loss(net, x, y, d, cfg)
    assert m["t_bucket_count"].sum() == 8
    assert m["t_bucket_sum_mse_u"].sum().item() == pytest.approx(8 * m["mse_u"].item(), rel=1e-10)
    assert m["perceptual_fraction"].item() == pytest.approx((d.t < 0.8).double().mean().item())
    assert 0 < m["loss_u"] < 1 and m["mse_u"] > 0 and m["du_dt_norm"] > 0


# ---- sampling (docs/method.md §3) ----

def test_one_step_sample_is_exactly_the_x_output():
    cfg = tiny_cfg(noise_scale=2.0)
    net = tiny_model(with_v_head=False)
    noise = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 5, 10])
    ones = torch.ones(3, dtype=torch.float64)
    x_hat, = net(2.0 * noise, ones, 7.5 * ones, 0.1 * ones, 0.8 * ones, y, heads="u")
    assert torch.equal(pmf.sample(net, noise, y, 7.5, 0.1, 0.8, cfg), x_hat)


@pytest.mark.parametrize("prediction", ["x", "u"])
def test_k_step_sample_follows_the_average_velocity(prediction):
    cfg = tiny_cfg(prediction=prediction)
    net = tiny_model(with_v_head=False)
    noise = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([1, 2])
    z = noise.clone()
    for t, r in [(1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)]:
        tt, rr = torch.full((2,), t, dtype=torch.float64), torch.full((2,), r, dtype=torch.float64)
        u, = pmf.predict(net, z, tt, rr, torch.full_like(tt, 6.5), 0.1 * torch.ones_like(tt), 0.7 * torch.ones_like(tt), y, cfg)
        z = z - (t - r) * u
    torch.testing.assert_close(pmf.sample(net, noise, y, 6.5, 0.1, 0.7, cfg, steps=3), z, rtol=1e-10, atol=1e-10)


def test_config_for_preset_and_bad_values():
    assert pmf.PMFConfig.for_preset("pMF-H/16").tr_uniform == 0.1
    assert pmf.PMFConfig.for_preset("pMF-L/32").noise_scale == 4.0
    with pytest.raises(ValueError, match="unknown PMFConfig fields"):
        pmf.PMFConfig.for_preset("pMF-B/16", noise_scael=2.0)
    with pytest.raises(ValueError, match="class_dropout_mode"):
        tiny_cfg(class_dropout_mode="random")
    with pytest.raises(ValueError, match="prediction"):
        tiny_cfg(prediction="eps")
