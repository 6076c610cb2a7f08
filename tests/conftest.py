import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as model_lib  # noqa: E402
import pmf  # noqa: E402

TINY = dict(input_size=16, in_channels=3, num_classes=10, depth=3, hidden_size=32, num_heads=2,
            patch_size=4, head_depth=2)


def tiny_model(dtype=torch.float64, seed=0, **overrides):
    """A tiny pMF DiT whose zero-initialised gates and final layers are randomised, so that
    every path (attention, MLP, both heads) contributes to the output."""
    torch.manual_seed(seed)
    net = model_lib.build_model(None, **{**TINY, **overrides}).to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("_gate", "final.linear.weight", "final.linear.bias")):
                p.normal_(0, 0.3)
    return net


def tiny_cfg(**overrides):
    return pmf.PMFConfig.for_preset("pMF-B/16", **{"num_classes": TINY["num_classes"], **overrides})


def batch(n=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g, dtype=dtype) * 2 - 1
    y = torch.randint(0, TINY["num_classes"], (n,), generator=g)
    return x, y


def flat_grads(net, loss):
    """Backpropagate `loss` from zeroed gradients; all parameter gradients as one flat vector."""
    net.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.fixture
def rel_err():
    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    return rel
