"""pixel MeanFlow: the training objective (paper Algorithm 1, docs/method.md §2) and sampling (§3).

Conventions (docs/method.md §1): x in [-1, 1], t = 1 is noise, z_t = (1 - t) x + t e with e = s * eps,
c(t) = clip(t, 0.05, 1). The network sees h = t - r only; t enters through 1/c(t) in the
conversion of its x-prediction to velocities: u = (z - x_u) / c(t), v = (z - x_v) / c(t).

The training step follows the official JAX step (`pmf.py` `pixelMeanFlow.forward` on branch `main`) with an exact
change of schedule: du/dt is a stop-gradient quantity, so nothing differentiates it.
`jvp="fast"` (default) propagates its tangent beside the primal of the one grad-mode forward
through the (possibly DDP-wrapped) network, without autograd (model.py, "single-pass tangent");
`jvp="simple"` takes a no-grad torch.func.jvp on the unwrapped network, then runs an ordinary
grad forward (docs/method.md §10.2). Both give the single-pass gradient, and DDP all-reduces it as usual.
"""
from dataclasses import dataclass, fields

import torch
from torch.distributed.fsdp import FSDPModule

from perceptual import sample_crop_boxes

# Per-preset recipe (docs/method.md §9): the official configs; H t_thr is the intended 0.6.
RECIPES = {
    "pMF-B/16": dict(noise_scale=1.0, P_mean=0.8, P_std=0.8, t_thr=0.8, cfg_beta=1.0, tr_uniform=0.0),
    "pMF-B/32": dict(noise_scale=2.0, P_mean=0.8, P_std=0.8, t_thr=0.8, cfg_beta=1.0, tr_uniform=0.0),
    "pMF-L/16": dict(noise_scale=1.0, P_mean=0.8, P_std=0.8, t_thr=0.8, cfg_beta=2.0, tr_uniform=0.0),
    "pMF-L/32": dict(noise_scale=4.0, P_mean=0.0, P_std=0.8, t_thr=0.6, cfg_beta=1.0, tr_uniform=0.0),
    "pMF-H/16": dict(noise_scale=2.0, P_mean=0.0, P_std=0.8, t_thr=0.6, cfg_beta=1.0, tr_uniform=0.1),
    "pMF-H/32": dict(noise_scale=4.0, P_mean=0.0, P_std=0.8, t_thr=0.6, cfg_beta=1.0, tr_uniform=0.1),
}
DROPOUT_MODES = ("prefix", "per_sample")
PREDICTIONS = ("x", "u")
JVP_PATHS = ("fast", "simple")


@dataclass(frozen=True)
class PMFConfig:
    """Method hyperparameters. Recipe values (first six) come from RECIPES via `for_preset`;
    the rest are the paper's constants shared by every model (docs/method.md §9)."""
    noise_scale: float          # s: e = s * eps, at training and sampling
    P_mean: float               # logit-normal t, r: sigmoid(P_std * n + P_mean)
    P_std: float
    t_thr: float                # perceptual terms only where t < t_thr (strict)
    cfg_beta: float             # p(omega) ~ omega^-beta on [1, 1 + cfg_max]
    tr_uniform: float           # probability of replacing (t, r) by uniform draws (H recipe: 0.1)
    num_classes: int = 1000     # label num_classes is the null (unconditional) label
    data_proportion: float = 0.5  # the first floor(0.5 B) rows get r = t
    cfg_max: float = 7.0        # omega in [1, 8]
    class_dropout: float = 0.1
    class_dropout_mode: str = "prefix"  # official "first k rows"; "per_sample" is the fixed variant (docs/method.md §2.4)
    t_clip: float = 0.05        # c(t) = clip(t, t_clip, 1)
    norm_eps: float = 0.01      # adaptive weight L / sg(L + eps)^p
    norm_p: float = 1.0
    lpips_weight: float = 0.4
    convnext_weight: float = 0.1
    prediction: str = "x"       # "x" (paper) or "u" (Table 2 ablation)
    t_buckets: int = 4          # metrics: raw u-MSE per equal-width t bucket
    jvp: str = "fast"           # du/dt by the single-pass tangent, or "simple" (torch.func.jvp pass)

    def __post_init__(self):
        if self.class_dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"class_dropout_mode must be one of {DROPOUT_MODES}, got {self.class_dropout_mode!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.jvp not in JVP_PATHS:
            raise ValueError(f"jvp must be one of {JVP_PATHS}, got {self.jvp!r}")
        for name in ("data_proportion", "class_dropout", "tr_uniform", "t_clip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.noise_scale <= 0 or self.P_std <= 0 or self.cfg_max < 0 or self.norm_eps <= 0:
            raise ValueError("noise_scale, P_std and norm_eps must be positive and cfg_max non-negative")

    @classmethod
    def for_preset(cls, name, **overrides):
        if name not in RECIPES:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(RECIPES)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown PMFConfig fields {unknown}")
        return cls(**{**RECIPES[name], **overrides})


@dataclass
class Draws:
    """Every random quantity of one training step, per sample (B rows)."""
    t: torch.Tensor         # (B,) in [0, 1]
    r: torch.Tensor         # (B,) with r <= t
    e: torch.Tensor         # (B, C, H, W) noise, already times noise_scale (None until drawn)
    omega: torch.Tensor     # (B,) CFG scale in [1, 1 + cfg_max]
    t_min: torch.Tensor     # (B,) CFG interval; [0, 1] on r = t rows
    t_max: torch.Tensor
    fm: torch.Tensor        # (B,) bool, the r = t prefix
    drop: torch.Tensor      # (B,) bool, rows whose label becomes null
    crops: torch.Tensor     # (B, 4) long (top, left, height, width) of the paired perceptual crop


def _rand(n, like, generator):
    return torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)


def sample_time(cfg, n, like, generator=None):
    """(t, r, fm) of docs/method.md §2.1: logit-normal pair, optional uniform mix, r = t prefix, then order."""
    def logit_normal():
        return torch.sigmoid(cfg.P_std * torch.randn(n, generator=generator, device=like.device, dtype=like.dtype) + cfg.P_mean)
    t, r = logit_normal(), logit_normal()
    uniform = _rand(n, like, generator) < cfg.tr_uniform
    t = torch.where(uniform, _rand(n, like, generator), t)
    r = torch.where(uniform, _rand(n, like, generator), r)
    fm = torch.arange(n, device=like.device) < int(n * cfg.data_proportion)
    r = torch.where(fm, t, r)
    return torch.maximum(t, r), torch.minimum(t, r), fm  # order after the prefix (docs/method.md §2.1)


def sample_omega(cfg, n, like, generator=None):
    """omega on [1, 1 + cfg_max] with density ~ omega^-beta, by inverse CDF (docs/method.md §2.2)."""
    u = _rand(n, like, generator)
    top = torch.tensor(1.0 + cfg.cfg_max, dtype=like.dtype, device=like.device)
    if cfg.cfg_beta == 1.0:
        return top ** u
    a = 1.0 - cfg.cfg_beta
    return torch.exp(torch.log1p(u * torch.expm1(a * torch.log(top))) / a)


def sample_dropout(cfg, n, like, generator=None):
    """Rows that get the null label: official prefix of k ~ Bin(n, p) rows, or a per-sample mask (docs/method.md §2.4)."""
    coin = _rand(n, like, generator) < cfg.class_dropout
    if cfg.class_dropout_mode == "per_sample":
        return coin
    return torch.arange(n, device=like.device) < coin.sum()


def _row_draws(cfg, n, height, width, like, generator):
    """Per-row draws of a batch of n (everything but the noise); see `Draws`."""
    t, r, fm = sample_time(cfg, n, like, generator)
    t_min = torch.where(fm, 0.0, 0.5 * _rand(n, like, generator))
    t_max = torch.where(fm, 1.0, 0.5 + 0.5 * _rand(n, like, generator))
    omega = sample_omega(cfg, n, like, generator)
    drop = sample_dropout(cfg, n, like, generator)
    crops = sample_crop_boxes(n, height, width, like, generator)
    return Draws(t, r, None, omega, t_min, t_max, fm, drop, crops)


def sample_draws(cfg, x, generator=None):
    """All random draws of one step for the image batch x: (B, C, H, W), from one generator."""
    draws = _row_draws(cfg, x.shape[0], x.shape[-2], x.shape[-1], x, generator)
    draws.e = cfg.noise_scale * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return draws


def step_draws(cfg, rows, global_batch, image_shape, seed, step, device, dtype=torch.float32):
    """Draws for `rows` of the global batch of optimizer step `step`, the same for any split of the
    batch over processes and accumulation steps: row draws come from one generator seeded by
    (seed, step) over the whole global batch (so the r = t and dropout prefixes are global, as in
    the official multi-host code on branch `hsdp`), noise from a generator seeded per (seed, step, row).
    """
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    like = torch.empty(0, dtype=dtype)
    full = _row_draws(cfg, global_batch, image_shape[-2], image_shape[-1], like,
                      torch.Generator().manual_seed((seed * 1_000_003 + step) % 2 ** 63))
    picked = {f.name: getattr(full, f.name)[rows].to(device) for f in fields(Draws) if f.name != "e"}
    noise_gen = torch.Generator(device).manual_seed(0)
    noise = []
    for row in rows.tolist():
        noise_gen.manual_seed(((seed * 1_000_003 + step) * 65_537 + row) % 2 ** 63)
        noise.append(torch.randn(image_shape, generator=noise_gen, device=device, dtype=dtype))
    return Draws(e=cfg.noise_scale * torch.stack(noise), **picked)


def compile_model(net, backend="inductor"):
    """torch.compile the network's forward in place (`nn.Module.compile`: the same module, parameters
    and state_dict keys, so checkpoints and EMAs are unaffected); returns net. Call it before the
    DDP wrap: DDP then calls the compiled forward, and so do pmf_loss's guidance queries on
    `net.module` and `sample`. Training (method.jvp=fast) and sampling only: `du_dt_jvp` refuses a
    compiled network, as compiled forward-mode AD drops tangents (pytorch #187284, #192985).

    Shapes: a micro-batch's r = t rows are a global prefix, so its tangent covers a fixed number of
    rows; only the guidance query's row count changes with the draws. Dynamo's automatic dynamic
    shapes compile such a call once static, then once with a symbolic batch at its first change;
    tests/test_compile.py counts the graphs of 50 steps with fresh draws.
    """
    net.compile(backend=backend)
    return net


def compile_wanted(setting, jvp, device):
    """training.compile resolved for `device`: true / false as set; null (auto) = on for CUDA when
    method.jvp is fast (config.py rejects true with simple), off on CPU."""
    if setting is None:
        return torch.device(device).type == "cuda" and jvp == "fast"
    return setting


def _is_compiled(net):
    return getattr(net, "_compiled_call_impl", None) is not None


def _col(s):
    return s[:, None, None, None]


def velocities(net, z, t, h, omega, t_min, t_max, y, cfg, heads="uv", attn="sdpa"):
    """Network outputs as velocities, one (B, C, H, W) per head: (z - x_hat) / c(t) for x-prediction."""
    outs = net(z, h, omega, t_min, t_max, y, heads=heads, attn=attn)
    if cfg.prediction == "u":
        return outs
    c = _col(t.clamp(cfg.t_clip, 1.0))
    return tuple((z - out) / c for out in outs)


def first_moving_row(t, r):
    """Index of the first row with r < t (len(t) if none); the rows before it are the r = t prefix."""
    moving = (t != r).nonzero()
    return moving[0, 0].item() if len(moving) else len(t)


def reused_v_c_rows(t, r, t_min, t_max, drop):
    """(B,) bool: the rows whose guidance query of v_c is the training forward's v-head output.

    On the r = t prefix (rows before `first_moving_row`) with the interval [0, 1] (every r = t
    row, docs/method.md §2.2) and the label kept, the query of v_c (h = 0, interval [0, 1], w_in = omega
    as t lies in [0, 1], label y) has exactly the inputs of the training forward (h = t - r = 0,
    the row's interval [0, 1] and omega, y_in = y), so its v-head output, detached, is v_c.
    """
    prefix = torch.arange(len(t), device=t.device) < first_moving_row(t, r)
    return prefix & (t_min == 0) & (t_max == 1) & ~drop


def fast_path_rows(t, r, t_min, t_max, drop):
    """(tangent_rows, reused): (B,) bool, the fast path's tangent rows (from the first r < t row on)
    and its `reused_v_c_rows`; `guidance_velocities` queries neither for v_c needlessly."""
    return torch.arange(len(t), device=t.device) >= first_moving_row(t, r), reused_v_c_rows(t, r, t_min, t_max, drop)


def guidance_rows(t, drop, t_min, t_max, cfg, tangent_rows=None, reused=None):
    """(cond, uncond): (B,) bool, the rows of `guidance_velocities`' v_c and v_u queries (its
    docstring says which rows need which); the arguments are its own."""
    inside = (t_min <= t) & (t <= t_max)  # inclusive, as the official code
    tangent_rows = torch.ones_like(drop) if tangent_rows is None else tangent_rows
    reused = torch.zeros_like(drop) if reused is None else reused
    takes_v_u = drop & (cfg.class_dropout_mode == "per_sample")
    return (~drop & ~reused) | (tangent_rows & ~takes_v_u), (inside & ~drop) | (tangent_rows & takes_v_u)


@torch.no_grad()
def guidance_velocities(model, z, t, y, drop, omega, t_min, t_max, cfg, tangent_rows=None, reused=None):
    """The v-head queries of the self-guided target (docs/method.md §2.3, §2.4), pruned exactly (§2.3).

    Returns (v_c, v_u, w_in): (B, C, H, W), (B, C, H, W), (B,). v_c is the conditional velocity at
    the interval-masked scale w_in (omega inside [t_min, t_max], 1 outside), v_u the unconditional
    one (null label, omega = 1); all queries use h = 0 and the interval [0, 1], in one v-head call.
    Each is queried only where something uses it, and is 0 elsewhere:
      v_c for the target on the kept rows (dropped rows take v_t), except the `reused` rows
      ((B,) bool, `reused_v_c_rows`; the caller fills them from its forward), and as the tangent
      on `tangent_rows` ((B,) bool, None = all; the fast path needs it only from the first r < t
      row on) unless they take v_u (dropped rows under per-sample dropout);
      v_u for the target where its weight 1 - 1/w_in is nonzero (inside the interval, kept), and
      as the tangent on dropped `tangent_rows` under per-sample dropout.
    The official code also queries v_c at omega on rows outside the interval (then again at 1)
    and v_u on every row; those values cannot change the result.
    """
    inside = (t_min <= t) & (t <= t_max)  # inclusive, as the official code
    w_in = torch.where(inside, omega, torch.ones_like(omega))
    cond, uncond = (rows.nonzero().squeeze(1) for rows in guidance_rows(t, drop, t_min, t_max, cfg, tangent_rows,
                                                                         reused))
    k, m = len(cond), len(uncond)
    v_c, v_u = torch.zeros_like(z), torch.zeros_like(z)
    if k + m or isinstance(model, FSDPModule):  # FSDP2 gathers weights in the forward: every process runs it
        rows = torch.cat([cond, uncond])
        v = velocities(model, z[rows], t[rows], t.new_zeros(k + m), torch.cat([w_in[cond], t.new_ones(m)]),
                       t.new_zeros(k + m), t.new_ones(k + m),
                       torch.cat([y[cond], torch.full_like(y[uncond], cfg.num_classes)]), cfg, heads="v")[0]
        v_c[cond], v_u[uncond] = v[:k], v[k:]
    return v_c, v_u, w_in


def guided_target(v_t, v_c, v_u, w_in, drop):
    """v_g = v_t + (1 - 1/w_in)(v_c - v_u), and v_t on the dropped rows; all (B, C, H, W)."""
    return torch.where(_col(drop), v_t, v_t + _col(1 - 1 / w_in) * (v_c - v_u))


def jvp_tangent(v_c, v_u, drop, cfg):
    """The z-tangent of du/dt: v_c, or v_u on the dropped rows under per-sample dropout (docs/method.md §2.4)."""
    return torch.where(_col(drop), v_u, v_c) if cfg.class_dropout_mode == "per_sample" else v_c


def du_dt_jvp(model, z, t, r, omega, t_min, t_max, y, tangent, cfg):
    """du/dt of F(z, t, r) = u(z, t, h = t - r, ...) along (tangent, 1, 0), stop-gradient (docs/method.md §2.5).

    No-grad forward-mode AD on the unwrapped network with explicit attention (flash / CPU SDPA
    have no forward AD, docs/method.md §10.1), in at least fp32 with autocast off (§10.4).
    """
    if _is_compiled(model):
        raise ValueError("method.jvp=simple needs an eager network (torch.func.jvp through compiled code drops "
                         "tangents, pytorch #187284, #192985); set training.compile=false or method.jvp=fast")

    def u_of(z_, t_, r_):
        return velocities(model, z_, t_, t_ - r_, omega, t_min, t_max, y, cfg, heads="u", attn="explicit")[0]

    primals = (_fp32_or_wider(z), _fp32_or_wider(t), _fp32_or_wider(r))
    tangents = (_fp32_or_wider(tangent), torch.ones_like(primals[1]), torch.zeros_like(primals[2]))
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        return torch.func.jvp(u_of, primals, tangents)[1]


def velocities_and_du_dt(net, z, t, r, omega, t_min, t_max, y, tangent, cfg):
    """(u, v, du/dt) from one grad-mode forward of the (possibly DDP-wrapped) network.

    du/dt is `du_dt_jvp`'s quantity (along (tangent, 1, 0), stop-gradient), carried beside the
    primal by the model's single-pass tangent; the x -> u conversion u = (z - x_u) / c(t) adds
    du/dt = (tangent - dx_u/dt - u c'(t)) / c(t), c' = 1 strictly inside (t_clip, 1) and 0 on
    and outside the bounds, as torch's clamp derivative (JAX's would give 1/2 exactly on a bound,
    a probability-zero event). u and v carry autograd; du/dt does not.

    du/dt enters the loss only through (t - r) du/dt, so the tangent is propagated only from the
    first row with r < t on (the r = t rows are a prefix, docs/method.md §2.1); earlier rows get 0.
    """
    start = first_moving_row(t, r)
    du_dt = torch.zeros_like(_fp32_or_wider(z))
    if start == len(t):
        return (*velocities(net, z, t, t - r, omega, t_min, t_max, y, cfg, heads="uv"), du_dt)
    rows = slice(start, None)
    outs, d_out = net(z, t - r, omega, t_min, t_max, y, heads="uv", tangent=(tangent[rows], torch.ones_like(t[rows])))
    if cfg.prediction == "u":
        du_dt[rows] = d_out
        return (*outs, du_dt)
    c = _col(t.clamp(cfg.t_clip, 1.0))
    u, v = ((z - out) / c for out in outs)
    with torch.no_grad():
        dc_dt = _col(((t > cfg.t_clip) & (t < 1.0)).to(c.dtype))[rows]
        du_dt[rows] = (_fp32_or_wider(tangent[rows]) - d_out - u[rows] * dc_dt) / c[rows]
    return u, v, du_dt


def adaptive_weight(loss, cfg):
    """A(L) = L / sg((L + eps)^p), applied to each per-sample term separately (docs/method.md §2.6)."""
    return loss / (loss + cfg.norm_eps).pow(cfg.norm_p).detach()


def _fp32_or_wider(a):
    return a.to(torch.promote_types(a.dtype, torch.float32))


def _per_sample_sq(a, b):
    """Per-sample sum over C x H x W of (a - b)^2, reduced in fp32 or wider (docs/method.md §10.4)."""
    return (_fp32_or_wider(a) - _fp32_or_wider(b)).pow(2).flatten(1).sum(1)


def pmf_loss(net, x, y, draws, cfg, perceptual=None):
    """The pMF objective for one batch. Returns (loss, metrics).

    net: the network, possibly DDP-wrapped (its `.module` is used for the no-grad passes);
    x: (B, C, H, W) images in [-1, 1]; y: (B,) labels in [0, num_classes);
    draws: from `sample_draws`; perceptual: a `perceptual.PerceptualLoss` or None (terms off).
    loss: scalar, batch mean of L_u + L_v + 0.4 A(LPIPS) + 0.1 A(ConvNeXt); metrics: detached.
    """
    model = getattr(net, "module", net)
    t, r, omega, t_min, t_max = draws.t, draws.r, draws.omega, draws.t_min, draws.t_max
    z = (1 - _col(t)) * x + _col(t) * draws.e                      # z_t
    v_t = (z - x) / _col(t.clamp(cfg.t_clip, 1.0))                 # (z_t - x) / c(t), docs/method.md §2.1
    y_in = torch.where(draws.drop, cfg.num_classes, y)              # class dropout, docs/method.md §2.4
    if cfg.jvp == "fast":
        tangent_rows, reused = fast_path_rows(t, r, t_min, t_max, draws.drop)
        v_c, v_u, w_in = guidance_velocities(model, z, t, y, draws.drop, omega, t_min, t_max, cfg, tangent_rows, reused)
        tangent = jvp_tangent(v_c, v_u, draws.drop, cfg)
        u, v, du_dt = velocities_and_du_dt(net, z, t, r, omega, t_min, t_max, y_in, tangent, cfg)
        v_c = torch.where(_col(reused), v.detach(), v_c)
    else:  # the reference schedule: the JVP needs the tangent on every row before the forward
        v_c, v_u, w_in = guidance_velocities(model, z, t, y, draws.drop, omega, t_min, t_max, cfg)
        tangent = jvp_tangent(v_c, v_u, draws.drop, cfg)
        du_dt = du_dt_jvp(model, z, t, r, omega, t_min, t_max, y_in, tangent, cfg)
        u, v = velocities(net, z, t, t - r, omega, t_min, t_max, y_in, cfg, heads="uv")
    v_g = guided_target(v_t, v_c, v_u, w_in, draws.drop)
    V = u + _col(t - r) * du_dt                                     # compound velocity, sg(du/dt)

    sq_u = _per_sample_sq(V, v_g)
    sq_v = _per_sample_sq(v, v_g)
    terms = {"loss_u": adaptive_weight(sq_u, cfg), "loss_v": adaptive_weight(sq_v, cfg)}

    use_perc = t < cfg.t_thr
    raw_perc = {}
    if perceptual is not None:
        x_tilde = z - _col(t) * u                                   # z_t - t u, unclipped t
        raw_perc = _perceptual_terms(perceptual, x_tilde, x, draws.crops, use_perc)
        terms["loss_lpips"] = cfg.lpips_weight * adaptive_weight(raw_perc["lpips"], cfg)
        terms["loss_convnext"] = cfg.convnext_weight * adaptive_weight(raw_perc["convnext"], cfg)

    loss = sum(terms.values()).mean()
    metrics = _metrics(loss, terms, raw_perc, sq_u, sq_v, du_dt, t, draws.fm, use_perc, x[0].numel(), cfg)
    return loss, metrics


def _perceptual_terms(perceptual, x_tilde, x, crops, mask):
    """Per-sample raw LPIPS and ConvNeXt distances, computed only on masked rows, 0 elsewhere."""
    idx = mask.nonzero().squeeze(1)
    lpips = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    convnext = torch.zeros_like(lpips)
    if idx.numel():
        lp, cn = perceptual(x_tilde[idx], x[idx], crops[idx])
        lpips = lpips.index_put((idx,), lp.to(lpips.dtype))
        convnext = convnext.index_put((idx,), cn.to(lpips.dtype))
    return {"lpips": lpips, "convnext": convnext}


@torch.no_grad()
def _metrics(loss, terms, raw_perc, sq_u, sq_v, du_dt, t, fm, use_perc, numel, cfg):
    """Raw MSEs next to the adaptive terms (docs/method.md §2.6: A(L) ~ 1 says little), ||du/dt||, t buckets."""
    mse_u = sq_u / numel
    m = {"loss": loss.detach()}
    m.update({name: term.mean().detach() for name, term in terms.items()})
    m["mse_u"], m["mse_v"] = mse_u.mean(), (sq_v / numel).mean()
    m["mse_u_r_eq_t"] = mse_u[fm].mean() if fm.any() else torch.zeros_like(m["mse_u"])
    m["mse_u_r_lt_t"] = mse_u[~fm].mean() if (~fm).any() else torch.zeros_like(m["mse_u"])
    moving = ~fm  # du/dt enters the loss only on r < t rows
    m["du_dt_norm"] = du_dt[moving].flatten(1).norm(dim=1).mean() if moving.any() else torch.zeros_like(m["mse_u"])
    m["perceptual_fraction"] = use_perc.float().mean()
    for name, raw in raw_perc.items():
        m[f"{name}_raw"] = raw.sum() / use_perc.sum().clamp(min=1)
    bucket = (t * cfg.t_buckets).long().clamp(max=cfg.t_buckets - 1)
    m["t_bucket_sum_mse_u"] = torch.zeros(cfg.t_buckets, device=t.device, dtype=mse_u.dtype).index_add(0, bucket, mse_u)
    m["t_bucket_count"] = torch.bincount(bucket, minlength=cfg.t_buckets).float()
    return m


def _check_labels(y, cfg):
    if y.dtype not in (torch.int32, torch.int64) or y.numel() and (y.min() < 0 or y.max() > cfg.num_classes):
        raise ValueError(f"labels must be integers in [0, {cfg.num_classes}] ({cfg.num_classes} = null); "
                         f"got dtype {y.dtype}, range [{y.min().item() if y.numel() else '-'}, "
                         f"{y.max().item() if y.numel() else '-'}]")


def predict(net, z, t, r, omega, t_min, t_max, y, cfg, heads="u"):
    """Velocities at (z, t, r): checked entry point. All conditioning (B,); returns a tuple of (B, C, H, W)."""
    if ((t < 0) | (t > 1)).any() or ((r < 0) | (r > 1)).any():
        raise ValueError("t and r must lie in [0, 1] (t = 1 is noise, t = 0 is data)")
    if (r > t).any():
        raise ValueError("r must not exceed t (the average velocity runs from r up to t)")
    _check_labels(y, cfg)
    return velocities(net, z, t, t - r, omega, t_min, t_max, y, cfg, heads=heads)


@torch.no_grad()
def sample(net, noise, y, omega, t_min, t_max, cfg, steps=1):
    """k-step pMF sampling (docs/method.md §3) from z_1 = noise_scale * noise; one step = one network evaluation.

    noise: (B, C, H, W) standard normal; y: (B,) labels; omega, t_min, t_max: floats or (B,).
    CFG is a network input: no unconditional pass, no batch doubling. Returns x: (B, C, H, W).
    With x-prediction a step is z_r = lerp(z, x_hat, (t - r) / c(t)), so one step (t = 1, r = 0)
    returns exactly the network's x-output.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_labels(y, cfg)
    z = cfg.noise_scale * noise
    cond = [torch.as_tensor(c, dtype=z.dtype, device=z.device).expand(z.shape[0]) for c in (omega, t_min, t_max)]
    for i in range(steps):
        t, r = 1 - i / steps, 1 - (i + 1) / steps
        h = torch.full((z.shape[0],), t - r, dtype=z.dtype, device=z.device)
        out, = net(z, h, *cond, y, heads="u")
        if cfg.prediction == "u":
            z = z - (t - r) * out
        else:
            z = torch.lerp(z, out, (t - r) / min(max(t, cfg.t_clip), 1.0))
    return z
