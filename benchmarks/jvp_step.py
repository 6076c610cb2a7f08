"""Step time, peak memory and MFU of the pMF training step and its JVP, side by side in one run.

    python benchmarks/jvp_step.py --batch 4                                # pMF-B/16 (config.yaml)
    python benchmarks/jvp_step.py --config quickstart.yaml --batch 64      # the quickstart's tiny model
    python benchmarks/jvp_step.py --batch 4 training.mixed_precision=bf16   # bf16 autocast, as train.py

Step times come from one process that runs every variant in turn, on the same inputs and draws:
two warm-up rounds, then --repeats timed rounds, the median per variant; drift in the machine's
speed thus hits all variants alike. Peak memory comes from one child process per variant running
two steps: on CUDA its max allocated; on CPU its peak RSS with glibc's mmap threshold fixed at
64 KiB, so that every large tensor is mapped and unmapped on its own and RSS follows the live
tensors as CUDA's max allocated does (with the default dynamic threshold freed activations stay in
the heap, and the peak RSS measures the heap's fragmentation too).

  fm          plain x-prediction flow-matching step, u-head only: forward + backward  (the 1.0x row)
  fm_uv       the same with both heads trained (a v-loss too), no JVP
  forward     no-grad forward of trunk + u-head (the unit of the tangent's cost)
  tangent     no-grad primal + single-pass tangent of the same network (the fast JVP pass alone)
  func_jvp    no-grad torch.func.jvp of the same network, explicit attention (the simple JVP pass)
  pmf         the pMF loss + backward as train.py runs it (method.jvp=fast), perceptual terms off
  pmf_query   the same, querying v_c on the kept r = t rows too instead of reusing the training
              forward's v-head output there (pmf.reused_v_c_rows: none): the step before that saving
  pmf_perc    the same with LPIPS-VGG and ConvNeXt-V2-B on (randomly initialised, same cost)
  split       method.jvp=simple: no-grad torch.func.jvp, then a separate grad forward + backward
  reference   the common way: grad-mode torch.func.jvp on the undistributed model, math attention,
              every activation stored (forward-mode AD does not pass activation checkpointing)

model.recompute_v_head (config) applies to fm_uv, pmf, pmf_perc and split.

Optimizer steps are not included (they are the same for every variant). MFU counts the network's
matmul FLOPs analytically (`flops_per_sample`; perceptual networks not counted) against a matmul of
the model's shapes, timed in the same run.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import os
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
import train  # noqa: E402

VARIANTS = ("fm", "fm_uv", "forward", "tangent", "func_jvp", "pmf", "pmf_query", "pmf_perc", "split", "reference")
LOSS_VARIANTS = ("pmf", "pmf_query", "pmf_perc", "split", "reference")


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


def flops_per_sample(net, method, draws):
    """Matmul FLOPs per image of each variant, counted from the model's shapes (2 per multiply-add).

    A block: 2 L (4 D^2 + 3 D F) for its linears, 4 L^2 D for q k^T and P v; its tangent repeats
    the linears and does 5 attention-sized products (P recomputed, dS, dP v, P dv). A backward is
    twice its forward, plus the v-head's forward again under model.recompute_v_head. Guidance:
    trunk + v-head on the rows `pmf.guidance_rows` queries (v_c and v_u rows): on the fast path
    (pmf, pmf_perc) v_c skips the kept r = t rows, which reuse the training forward's v-head
    output, and the dropped r = t rows, which need none; method.jvp=simple (split, reference)
    queries v_c on every row.
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
    train_uv = 3 * fwd_uv + (fwd_uv - fwd_u) * net.recompute_v_head
    tangent = fwd_u + (trunk + head) * 1.5 * attn
    moving = (draws.t != draws.r).float().mean().item()  # the fast path's tangent covers r < t rows only
    d = draws
    tangent_rows, reused = pmf.fast_path_rows(d.t, d.r, d.t_min, d.t_max, d.drop)
    fast = guidance_rows_per_sample(method, d, (tangent_rows, reused)) * fwd_u
    query = guidance_rows_per_sample(method, d, (tangent_rows, None)) * fwd_u
    simple = guidance_rows_per_sample(method, d, (None, None)) * fwd_u  # the v path costs what the u path does
    return {"fm": 3 * fwd_u, "fm_uv": train_uv, "forward": fwd_u, "tangent": fwd_u + tangent, "func_jvp": fwd_u + tangent,
            "pmf": fast + moving * tangent + train_uv, "pmf_query": query + moving * tangent + train_uv,
            "pmf_perc": fast + moving * tangent + train_uv,
            "split": simple + fwd_u + tangent + train_uv, "reference": simple + tangent + 3 * fwd_uv}


def guidance_rows_per_sample(method, draws, fast_rows):
    """Rows of the guidance query (v_c rows + v_u rows, `pmf.guidance_rows`) per image of the batch;
    fast_rows: `pmf.fast_path_rows` of the draws (method.jvp=fast) or (None, None) (simple)."""
    cond, uncond = pmf.guidance_rows(draws.t, draws.drop, draws.t_min, draws.t_max, method, *fast_rows)
    return (cond.sum() + uncond.sum()).item() / len(draws.t)


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
    return net, method, x, y, draws, cfg.training.mixed_precision


def step_fn(variant, net, method, x, y, d, precision):
    """One step of `variant` (see the module docstring) as a closure."""
    t, ones = d.t, torch.ones_like(d.t)
    z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * d.e
    cond = (t - d.r, d.omega, d.t_min, d.t_max, y)
    perc = None
    if variant == "pmf_perc":
        perc = perceptual_lib.PerceptualLoss(perceptual_lib.build_lpips(pretrained=False),
                                             perceptual_lib.build_convnext(pretrained=False)).to(x.device)
    loss_cfg = dataclasses.replace(method, jvp="simple") if variant == "split" else method
    if variant == "reference":
        net = copy.deepcopy(net)
        net.recompute_v_head = False
    loss_net = FuncJvpNet(net) if variant == "reference" else net
    parts = train.StepParts(net=loss_net, method_cfg=loss_cfg, precision=precision, perceptual=perc,
                            scaler=torch.amp.GradScaler(x.device.type, enabled=False))

    def run():
        if variant in LOSS_VARIANTS:
            with querying_v_c(variant == "pmf_query"):
                train.forward_backward(parts, x, y, d)  # the micro-step of train.train_step
            net.zero_grad(set_to_none=True)
            return
        with train.autocast(precision, x.device):
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
        net.zero_grad(set_to_none=True)
    return run


@contextlib.contextmanager
def querying_v_c(on):
    """With `on`, pmf.reused_v_c_rows reuses no row: the guidance queries v_c on every kept row."""
    real = pmf.reused_v_c_rows
    if on:
        pmf.reused_v_c_rows = lambda t, *rest: torch.zeros_like(t, dtype=torch.bool)
    try:
        yield
    finally:
        pmf.reused_v_c_rows = real


def runnable(variants, net):
    """The variants this model can run; pmf_perc needs RGB images (the perceptual networks' input)."""
    return [v for v in variants if v != "pmf_perc" or net.in_channels == 3]


def timing_child(args):
    """Every variant in this one process, interleaved: two warm-up rounds, then --repeats rounds
    that each time one step of every variant, so that drift in the machine's speed hits all alike."""
    net, method, x, y, draws, precision = setup(args)
    variants = runnable(args.variants.split(","), net)
    runs = {v: step_fn(v, net, method, x, y, draws, precision) for v in variants}
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)
    times = {v: [] for v in variants}
    for round_ in range(2 + args.repeats):
        for v, run in runs.items():
            start = time.perf_counter()
            run()
            sync()
            if round_ >= 2:
                times[v].append(time.perf_counter() - start)
    flops = flops_per_sample(net, method, draws)
    print(json.dumps({v: {"seconds": statistics.median(times[v]), "flops": flops[v] * args.batch} for v in variants}))


def memory_child(args):
    """Peak memory of one variant alone in this process over two steps (module docstring)."""
    net, method, x, y, draws, precision = setup(args)
    run = step_fn(args.memory_child, net, method, x, y, draws, precision)
    setup_peak = train.peak_memory_bytes(x.device)
    for _ in range(2):
        run()
    peak = train.peak_memory_bytes(x.device)
    print(json.dumps({"peak": peak, "setup": setup_peak}))


def matmul_flops_per_second(args):
    """Best achieved FLOP/s over the block's matmul shapes, (B*L, D) x (D, D), (B*L, D) x (D, F)
    and (B*L, F) x (F, D), in the step's matmul dtype: the fastest of 20 products into a
    preallocated output (the machine's matmul peak, without allocation costs)."""
    net, method, x, *_, precision = setup(args)
    d, width, rows = net.pos_embed.shape[-1], net.u_head[0].mlp.w1.out_features, args.batch * net.pos_embed.shape[1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    best = 0.0
    for inner, outer in ((d, d), (d, width), (width, d)):
        a = torch.randn(rows, inner, device=x.device, dtype=dtype)
        b = torch.randn(inner, outer, device=x.device, dtype=dtype)
        out = torch.empty(rows, outer, device=x.device, dtype=dtype)
        for _ in range(20):
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            best = max(best, 2 * rows * inner * outer / (time.perf_counter() - start))
    return best


LIVE_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # CPU: RSS follows the live tensors (module docstring)


def run_child(args, flag, env):
    """This script in a fresh process with the hidden `flag`; its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), *flag, "--config", args.config, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--device", args.device, "--variants", args.variants, *args.overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{' '.join(flag)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml", help="model shape and method recipe")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after two warm-up rounds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. training.mixed_precision=bf16")
    args = p.parse_args(argv)
    if args.timing_child:
        return timing_child(args)
    if args.memory_child:
        return memory_child(args)
    matmul = matmul_flops_per_second(args)
    cfg = config_lib.load_config(args.config, args.overrides)
    print(f"{args.config} {' '.join(args.overrides)}: batch {args.batch}, {cfg.training.mixed_precision} precision, "
          f"{args.device}, {torch.get_num_threads()} threads; matmul {matmul / 1e9:.1f} GFLOP/s", flush=True)
    rows = run_child(args, ["--timing-child"], os.environ)
    for variant in args.variants.split(","):
        if variant not in rows:
            print(f"{variant:10s} skipped: the perceptual networks take RGB images")
            continue
        env = {**os.environ, **LIVE_RSS_ENV} if args.device == "cpu" else os.environ
        rows[variant].update(run_child(args, ["--memory-child", variant], env))
    print(f"{'variant':10s} {'median s':>9s} {'img/s':>8s} {'x fm':>6s} {'peak GB':>8s} {'x fm':>6s} "
          f"{'step GB':>8s} {'MFU':>6s}")
    base = rows.get("fm", next(iter(rows.values())))
    for variant, r in rows.items():
        print(f"{variant:10s} {r['seconds']:9.3f} {args.batch / r['seconds']:8.1f} {r['seconds'] / base['seconds']:6.2f} "
              f"{r['peak'] / 2 ** 30:8.2f} {r['peak'] / base['peak']:6.2f} {(r['peak'] - r['setup']) / 2 ** 30:8.3f} "
              f"{r['flops'] / r['seconds'] / matmul:6.1%}")
    if {"forward", "tangent"} <= set(rows):
        fwd = rows["forward"]["seconds"]
        fwd_flops = rows["forward"]["flops"]
        print(f"tangent alone: {(rows['tangent']['seconds'] - fwd) / fwd:.2f}x a no-grad forward "
              f"(primal + tangent {rows['tangent']['seconds'] / fwd:.2f}x); its matmul FLOPs are "
              f"{(rows['tangent']['flops'] - fwd_flops) / fwd_flops:.3f}x the forward's")
    if {"pmf", "pmf_query"} <= set(rows):
        print(f"v_c reuse on r = t rows: pmf step {rows['pmf_query']['seconds'] / rows['pmf']['seconds']:.3f}x faster "
              f"than querying it ({rows['pmf_query']['seconds']:.3f} s -> {rows['pmf']['seconds']:.3f} s)")
    for other in ("split", "reference"):
        if {"pmf", other} <= set(rows):
            print(f"pmf step {rows[other]['seconds'] / rows['pmf']['seconds']:.2f}x faster than {other}")


if __name__ == "__main__":
    main()
