"""Step time, peak memory and MFU of the pMF training step and its JVP, side by side in one run.

    python benchmarks/jvp_step.py --batch 4                                # pMF-B/16 (config.yaml)
    python benchmarks/jvp_step.py --config quickstart.yaml --batch 64      # the quickstart's tiny model
    python benchmarks/jvp_step.py --batch 4 training.mixed_precision=bf16   # bf16 autocast, as train.py

Every variant runs in its own child process (so its peak memory is its own: peak RSS on CPU, max
allocated on CUDA) for --repeats timed steps after two warm-ups, on the same inputs and draws:

  fm          plain x-prediction flow-matching step, u-head only: forward + backward  (the 1.0x row)
  fm_uv       the same with both heads trained (a v-loss too): the memory floor of any pMF step
  forward     no-grad forward of trunk + u-head (the unit of the tangent's cost)
  tangent     no-grad primal + single-pass tangent of the same network (the fast JVP pass alone)
  func_jvp    no-grad torch.func.jvp of the same network, explicit attention (the simple JVP pass)
  pmf         the pMF loss + backward as train.py runs it (method.jvp=fast), perceptual terms off
  pmf_perc    the same with LPIPS-VGG and ConvNeXt-V2-B on (randomly initialised, same cost)
  split       method.jvp=simple: no-grad torch.func.jvp, then a separate grad forward + backward
  reference   the common way: grad-mode torch.func.jvp on the undistributed model, math attention

Optimizer steps are not included (they are the same for every variant). MFU counts the network's
matmul FLOPs analytically (`flops_per_sample`; perceptual networks not counted) against a matmul of
the model's shapes, timed in the same run.
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config as config_lib  # noqa: E402
import model as model_lib  # noqa: E402
import perceptual as perceptual_lib  # noqa: E402
import pmf  # noqa: E402

VARIANTS = ("fm", "fm_uv", "forward", "tangent", "func_jvp", "pmf", "pmf_perc", "split", "reference")


class FuncJvpNet(torch.nn.Module):
    """The network with its tangent taken the common way: grad-mode torch.func.jvp through the
    explicit-attention forward (so the tangent's graph is built), same interface as PMFDiT."""

    def __init__(self, net):
        super().__init__()
        self.module = net

    def forward(self, z, h, omega, t_min, t_max, y, heads="uv", attn="sdpa", tangent=None):
        if tangent is None:
            return self.module(z, h, omega, t_min, t_max, y, heads=heads, attn=attn)

        def outputs(z_, h_):
            outs = self.module(z_, h_, omega, t_min, t_max, y, heads=heads, attn="explicit")
            return outs[heads.index("u")], outs

        n = tangent[0].shape[0]  # the common way takes the JVP over every row
        full = tuple(torch.cat([torch.zeros_like(p[:len(p) - n]), d]) for p, d in zip((z, h), tangent))
        _, d_u, outs = torch.func.jvp(outputs, (z, h), full, has_aux=True)
        return outs, d_u[len(z) - n:]


def flops_per_sample(net, draws):
    """Matmul FLOPs per image of each variant, counted from the model's shapes (2 per multiply-add).

    A block: 2 L (4 D^2 + 3 D F) for its linears, 4 L^2 D for q k^T and P v; its tangent repeats
    the linears and does 5 attention-sized products (P recomputed, dS, dP v, P dv). A backward is
    twice its forward. Guidance: trunk + v-head on 2B rows plus the rows outside their interval.
    """
    d, tokens, patches = net.pos_embed.shape[-1], net.pos_embed.shape[1], net.grid ** 2
    width = net.u_head[0].mlp.w1.out_features
    linears, attn = 2 * tokens * (4 * d * d + 3 * d * width), 4 * tokens * tokens * d
    conv1 = net.patch_embed.conv1
    embed = 2 * patches * (conv1.weight[0].numel() * conv1.out_channels + conv1.out_channels * d) + 4 * 2 * (256 * d + d * d)
    final = 2 * patches * d * net.u_final.linear.out_features
    trunk, head = len(net.trunk), len(net.u_head)
    fwd_u = embed + (trunk + head) * (linears + attn) + final
    fwd_uv = fwd_u + head * (linears + attn) + final
    tangent = fwd_u + (trunk + head) * 1.5 * attn
    moving = (draws.t != draws.r).float().mean().item()  # the fast path's tangent covers r < t rows only
    inside = (draws.t_min <= draws.t) & (draws.t <= draws.t_max)
    guidance = (2 + (~inside).float().mean().item()) * fwd_u  # the v path costs what the u path does
    return {"fm": 3 * fwd_u, "fm_uv": 3 * fwd_uv, "forward": fwd_u, "tangent": fwd_u + tangent, "func_jvp": fwd_u + tangent,
            "pmf": guidance + moving * tangent + 3 * fwd_uv, "pmf_perc": guidance + moving * tangent + 3 * fwd_uv,
            "split": guidance + fwd_u + tangent + 3 * fwd_uv, "reference": guidance + tangent + 3 * fwd_uv}


def setup(args):
    cfg = config_lib.load_config(args.config, args.overrides)
    method = config_lib.method_config(cfg)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = model_lib.build_model(cfg.model.name, **config_lib.model_overrides(cfg)).to(device)
    with torch.no_grad():  # a trained-like network: gates and final layers away from their zero init
        for name, p in net.named_parameters():
            if name.endswith(("_gate", "final.linear.weight")):
                p.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, net.in_channels, net.input_size, net.input_size, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, method.num_classes, (args.batch,), generator=gen).to(device)
    draws = pmf.step_draws(method, range(args.batch), args.batch, x.shape[1:], 0, 0, device)
    precision = cfg.training.mixed_precision
    autocast = dict(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                    enabled=precision != "no")
    return net, method, x, y, draws, autocast


def step_fn(variant, net, method, x, y, d, autocast):
    """One step of `variant` (see the module docstring) as a closure."""
    t, ones = d.t, torch.ones_like(d.t)
    z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * d.e
    cond = (t - d.r, d.omega, d.t_min, d.t_max, y)
    perc = None
    if variant == "pmf_perc":
        perc = perceptual_lib.PerceptualLoss(perceptual_lib.build_lpips(pretrained=False),
                                             perceptual_lib.build_convnext(pretrained=False)).to(x.device)
    loss_cfg = dataclasses.replace(method, jvp="simple") if variant == "split" else method
    loss_net = FuncJvpNet(net) if variant == "reference" else net

    def run():
        with torch.autocast(**autocast):
            if variant in ("fm", "fm_uv"):
                c = t.clamp(method.t_clip, 1)[:, None, None, None]
                outs = net(z, 0 * t, ones, 0 * t, ones, y, heads="u" if variant == "fm" else "uv")
                sum(((z - x_hat) / c - (z - x) / c).pow(2).mean() for x_hat in outs).backward()
            elif variant == "forward":
                with torch.no_grad():
                    net(z, *cond, heads="u")
            elif variant == "tangent":
                with torch.no_grad():
                    net(z, *cond, heads="u", tangent=(d.e - x, ones))
            elif variant == "func_jvp":
                pmf.du_dt_jvp(net, z, t, d.r, d.omega, d.t_min, d.t_max, y, d.e - x, method)
            else:
                pmf.pmf_loss(loss_net, x, y, d, loss_cfg, perc)[0].backward()
        net.zero_grad(set_to_none=True)
    return run


def child(args):
    net, method, x, y, draws, autocast = setup(args)
    if args.child == "pmf_perc" and net.in_channels != 3:
        return print(json.dumps({"skipped": "the perceptual networks take RGB images"}))
    run = step_fn(args.child, net, method, x, y, draws, autocast)
    cuda = x.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(x.device)) if cuda else (lambda: None)
    setup_peak = torch.cuda.max_memory_allocated(x.device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):  # warm-up: allocator and kernel caches
        run()
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(x.device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    flops = flops_per_sample(net, draws)[args.child] * args.batch
    print(json.dumps({"seconds": statistics.median(times), "peak": peak, "setup": setup_peak, "flops": flops}))


def matmul_flops_per_second(args):
    """Best achieved FLOP/s over the block's matmul shapes, (B*L, D) x (D, D), (B*L, D) x (D, F)
    and (B*L, F) x (F, D), in the step's matmul dtype."""
    net, method, x, *_, autocast = setup(args)
    d, width, rows = net.pos_embed.shape[-1], net.u_head[0].mlp.w1.out_features, args.batch * net.pos_embed.shape[1]
    dtype = autocast["dtype"] if autocast["enabled"] else torch.float32
    best = 0.0
    for inner, outer in ((d, d), (d, width), (width, d)):
        a = torch.randn(rows, inner, device=x.device, dtype=dtype)
        b = torch.randn(inner, outer, device=x.device, dtype=dtype)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            a @ b
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * rows * inner * outer / statistics.median(times[1:]))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml", help="model shape and method recipe")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after two warm-ups)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. training.mixed_precision=bf16")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    matmul = matmul_flops_per_second(args)
    cfg = config_lib.load_config(args.config, args.overrides)
    print(f"{args.config} {' '.join(args.overrides)}: batch {args.batch}, {cfg.training.mixed_precision} precision, "
          f"{args.device}, {torch.get_num_threads()} threads; matmul {matmul / 1e9:.1f} GFLOP/s")
    print(f"{'variant':10s} {'median s':>9s} {'img/s':>8s} {'x fm':>6s} {'peak GB':>8s} {'x fm':>6s} "
          f"{'step GB':>8s} {'MFU':>6s}")
    rows = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--config", args.config,
               "--batch", str(args.batch), "--repeats", str(args.repeats), "--device", args.device, *args.overrides]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"variant {variant} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if "skipped" in r:
            print(f"{variant:10s} skipped: {r['skipped']}")
            continue
        rows[variant] = r
        base = rows.get("fm", r)
        print(f"{variant:10s} {r['seconds']:9.3f} {args.batch / r['seconds']:8.1f} {r['seconds'] / base['seconds']:6.2f} "
              f"{r['peak'] / 2 ** 30:8.2f} {r['peak'] / base['peak']:6.2f} {(r['peak'] - r['setup']) / 2 ** 30:8.3f} "
              f"{r['flops'] / r['seconds'] / matmul:6.1%}", flush=True)
    if {"forward", "tangent"} <= set(rows):
        fwd = rows["forward"]["seconds"]
        print(f"tangent alone: {(rows['tangent']['seconds'] - fwd) / fwd:.2f}x a no-grad forward "
              f"(primal + tangent {rows['tangent']['seconds'] / fwd:.2f}x)")
    for other in ("split", "reference"):
        if {"pmf", other} <= set(rows):
            print(f"pmf step {rows[other]['seconds'] / rows['pmf']['seconds']:.2f}x faster than {other}")


if __name__ == "__main__":
    main()
