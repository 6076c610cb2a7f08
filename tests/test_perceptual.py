"""perceptual.py: paired crops, frozen networks, masking in the loss, clear errors when weights are absent."""
import math

import pytest
import torch
import torch.nn.functional as F

import perceptual
import pmf
from conftest import batch, tiny_cfg, tiny_model

TINY_CONVNEXT = dict(depths=[1, 1], hidden_sizes=[8, 16], num_stages=2)


@pytest.fixture(scope="module")
def tiny_perceptual():
    """Random-init LPIPS-VGG (v0.1 layout) and a tiny ConvNeXt-V2: no pretrained weights offline."""
    torch.manual_seed(0)
    return perceptual.PerceptualLoss(perceptual.build_lpips(pretrained=False),
                                     perceptual.build_convnext(pretrained=False, **TINY_CONVNEXT), size=16)


def test_crop_boxes_follow_random_resized_crop_ranges():
    boxes = perceptual.sample_crop_boxes(20000, 64, 48, torch.empty(0), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    assert (h >= 1).all() and (w >= 1).all()
    unclipped = (h < 64) & (w < 48)
    frac = (h * w).double()[unclipped] / (64 * 48)
    assert frac.min() > 0.07 and frac.max() < 1.05
    aspect = (w.double() / h.double())[unclipped & (h > 20)]
    assert aspect.min() > 0.7 and aspect.max() < 1.45
    assert top.double().std() > 1 and left.double().std() > 1  # offsets really vary


def test_paired_crop_uses_one_box_for_both_images():
    a = torch.randn(3, 3, 20, 20)
    boxes = torch.tensor([[0, 0, 20, 20], [2, 5, 10, 12], [7, 1, 13, 9]])
    ca, cb = perceptual.paired_crop(a, a.clone(), boxes, 16)
    assert torch.equal(ca, cb) and ca.shape == (3, 3, 16, 16)
    manual = F.interpolate(a[1:2, :, 2:12, 5:17], size=(16, 16), mode="bicubic", antialias=True)
    assert torch.equal(ca[1:2], manual)


def test_perceptual_distances_zero_for_identical_images_and_frozen(tiny_perceptual):
    loss = tiny_perceptual
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    boxes = perceptual.sample_crop_boxes(2, 32, 32, x)
    lp, cn = loss(x, x, boxes)
    assert lp.shape == cn.shape == (2,)
    assert torch.allclose(lp, torch.zeros(2), atol=1e-6) and torch.allclose(cn, torch.zeros(2), atol=1e-6)
    lp, cn = loss(x + 0.3 * torch.randn_like(x), x, boxes)
    assert (lp > 0).all() and (cn > 0).all()
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training and not loss.convnext_net.training


def test_convnext_pooled_layernorm_uses_official_eps():
    net = perceptual.build_convnext(pretrained=False, **TINY_CONVNEXT)
    assert net.layernorm.eps == 1e-6


def test_loss_applies_perceptual_terms_only_below_t_thr(tiny_perceptual):
    cfg = tiny_cfg(t_thr=0.6)
    net = tiny_model(dtype=torch.float32)
    x, y = batch(8, dtype=torch.float32)
    d = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(0))
    d.t[:] = torch.tensor([0.1, 0.59, 0.6, 0.9, 0.3, 0.7, 0.2, 0.95])
    d.r = torch.minimum(d.r, d.t)
    seen = []

    def loss_fn(a, b, boxes):
        seen.append(len(a))
        return tiny_perceptual(a, b, boxes)
    loss, m = pmf.pmf_loss(net, x, y, d, cfg, perceptual=loss_fn)
    assert seen == [4]  # rows with t < 0.6 (strict): t = 0.1, 0.59, 0.3, 0.2
    assert m["perceptual_fraction"].item() == 0.5
    assert m["loss_lpips"] > 0 and m["loss_convnext"] > 0
    base, _ = pmf.pmf_loss(net, x, y, d, cfg)
    # each weighted term is lambda * A(L) with A(L) = L / (L + 0.01) in (0, 1): 4 of 8 rows
    assert 0 < (loss - base).item() < (0.4 + 0.1) * 4 / 8
    loss.backward()
    assert net.u_final.linear.weight.grad.abs().sum() > 0


def test_missing_pretrained_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match=f"VGG16.*{missing}.*nothing is downloaded"):
        perceptual.build_lpips(vgg_path=str(missing))
    with pytest.raises(FileNotFoundError, match="ConvNeXt-V2-Base.*nothing is downloaded"):
        perceptual.build_convnext(path=str(tmp_path / "convnext"))


def test_lpips_loads_a_torchvision_vgg16_file(tmp_path):
    import torchvision
    features = torchvision.models.vgg16().features.state_dict()
    path = tmp_path / perceptual.VGG16_FILE
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    net = perceptual.build_lpips(vgg_path=str(path))
    assert torch.equal(net.net.slice3.get_parameter("10.weight"), features["10.weight"])
    lin = net.lins[0].model[-1].weight
    assert not math.isclose(lin.abs().sum().item(), 0.0)  # the v0.1 lin weights from the wheel
