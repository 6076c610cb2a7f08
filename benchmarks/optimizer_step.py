"""Optimizer step time for a pMF preset's parameter shapes, NS in fp32 vs bf16, and its share of
one pMF training step (perceptual terms off) at a given batch. Run by hand; prints a table.

    python benchmarks/optimizer_step.py --model pMF-B/16 --batch 32
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_lib  # noqa: E402
import optimizer  # noqa: E402
import pmf  # noqa: E402


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pMF-B/16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-repeats", type=int, default=1)
    parser.add_argument("--ns-dtypes", default="float32,bfloat16", help="Newton-Schulz precisions to time")
    args = parser.parse_args()

    net = model_lib.build_model(args.model)
    print(f"{args.model}, {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads, batch {args.batch}", flush=True)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    rows = []
    for name in args.ns_dtypes.split(","):
        dtype = getattr(torch, name)
        opt = optimizer.MuonAdamW(optimizer.partition(net), ns_dtype=dtype)
        opt.step()  # creates the state
        rows.append((f"optimizer step, NS {name}", timed(opt.step, args.repeats)))
        print(f"{rows[-1][0]:32s} {rows[-1][1]:10.2f} s", flush=True)

    cfg = pmf.PMFConfig.for_preset(args.model)
    x = torch.rand(args.batch, 3, net.input_size, net.input_size) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (args.batch,))
    gen = torch.Generator().manual_seed(0)

    def train_step():
        loss, _ = pmf.pmf_loss(net, x, y, pmf.sample_draws(cfg, x, gen), cfg)
        loss.backward()

    step = timed(train_step, args.train_repeats)
    print(f"{'what':32s} {'median s':>10s} {'share of a training step':>26s}")
    print(f"{'pMF loss + backward':32s} {step:10.2f}")
    for what, seconds in rows:
        print(f"{what:32s} {seconds:10.2f} {seconds / (seconds + step):25.1%}")


if __name__ == "__main__":
    main()
