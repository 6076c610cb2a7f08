"""Perceptual terms of the pMF loss (docs/method.md §2.7).

LPIPS-VGG (v0.1 lin layers, the PyPI `lpips` package) and the ConvNeXt-V2-Base pooled feature
distance (HF `transformers`), both on one paired random-resized crop per sample, resized to
224 x 224 with antialiased bicubic. Both networks are frozen and stay outside DDP.
Pretrained weights come from a path or the standard caches; nothing is downloaded.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, as in the torch hub cache
CONVNEXT_ID = "facebook/convnextv2-base-22k-224"
CONVNEXT_BASE = dict(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024])
CONVNEXT_LN_EPS = 1e-6  # the official pooled LayerNorm eps (HF's config default is 1e-12)


def sample_crop_boxes(n, height, width, like, generator=None):
    """(n, 4) long boxes (top, left, h, w): area U(0.08, 1), log-uniform aspect in (3/4, 4/3),
    side = round(sqrt(area * aspect)) clipped to the image, uniform integer offset; no retry loop."""
    u = torch.rand(n, 4, generator=generator, device=like.device, dtype=torch.float64)
    area = height * width * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 0])
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * aspect).round().clamp(1, width).long()
    h = torch.sqrt(area / aspect).round().clamp(1, height).long()
    top = (u[:, 2] * (height - h + 1)).floor().long().clamp(max=height - h)
    left = (u[:, 3] * (width - w + 1)).floor().long().clamp(max=width - w)
    return torch.stack([top, left, h, w], dim=1)


def paired_crop(a, b, boxes, size):
    """Crop a and b, (n, C, H, W), with the same box per sample and resize to (n, C, size, size)."""
    def crop(img, box):
        top, left, h, w = box.tolist()
        patch = img[None, :, top:top + h, left:left + w]
        return F.interpolate(patch, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out_a = torch.cat([crop(img, box) for img, box in zip(a, boxes)])
    out_b = torch.cat([crop(img, box) for img, box in zip(b, boxes)])
    return out_a, out_b


class PerceptualLoss(nn.Module):
    """forward(x_pred, x, boxes) -> (lpips (n,), convnext (n,)) raw per-sample distances.

    x_pred, x: (n, C, H, W) in [-1, 1]; gradients flow into x_pred only. A network left as None
    contributes zeros.
    """

    def __init__(self, lpips_net=None, convnext_net=None, size=224):
        super().__init__()
        self.lpips_net, self.convnext_net, self.size = lpips_net, convnext_net, size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen feature networks: always in eval mode

    def forward(self, x_pred, x, boxes):
        a, b = paired_crop(x_pred, x, boxes, self.size)
        zeros = torch.zeros(x.shape[0], device=x.device)
        lpips = self.lpips_net(a, b).flatten() if self.lpips_net is not None else zeros
        if self.convnext_net is None:
            return lpips, zeros
        feats = self.convnext_net(pixel_values=torch.cat([a, b])).pooler_output  # no ImageNet normalisation
        fa, fb = feats.chunk(2)
        return lpips, (fa - fb).pow(2).sum(1)


def _missing(what, path, fix):
    raise FileNotFoundError(f"{what} weights not found at {path}. {fix} "
                            "(nothing is downloaded at run time), or disable the term in the config.")


def build_lpips(vgg_path=None, pretrained=True):
    """LPIPS-VGG v0.1: lin layers from the `lpips` wheel, VGG16 trunk from `vgg_path` or the torch hub cache."""
    import lpips
    path = vgg_path or os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    if pretrained and not os.path.isfile(path):
        _missing("VGG16 (LPIPS trunk)", path, f"Copy torchvision's {VGG16_FILE} there or pass its path")
    net = lpips.LPIPS(net="vgg", version="0.1", pretrained=pretrained, pnet_rand=True, verbose=False)
    if pretrained:
        vgg = torch.load(path, map_location="cpu", weights_only=True)
        slices = {f"slice{s}.{i}": f"features.{i}" for s, (lo, hi) in
                  enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], 1) for i in range(lo, hi)}
        trunk = {f"{ours}.{p}": vgg[f"{theirs}.{p}"] for ours, theirs in slices.items()
                 for p in ("weight", "bias") if f"{theirs}.{p}" in vgg}
        net.net.load_state_dict(trunk, strict=True)
    return net


def build_convnext(path=None, pretrained=True, **config):
    """ConvNeXt-V2-Base (22k, 224) from `path` or the HF cache; random init with pretrained=False.

    config: ConvNextV2Config overrides for random-init builds (tests use tiny shapes).
    """
    from transformers import ConvNextV2Config, ConvNextV2Model
    if not pretrained:
        return ConvNextV2Model(ConvNextV2Config(**{**CONVNEXT_BASE, "layer_norm_eps": CONVNEXT_LN_EPS, **config}))
    try:
        return ConvNextV2Model.from_pretrained(path or CONVNEXT_ID, local_files_only=True,
                                               layer_norm_eps=CONVNEXT_LN_EPS)
    except OSError:
        _missing("ConvNeXt-V2-Base", path or f"the HF cache ({CONVNEXT_ID})",
                 "Save the model with save_pretrained() on a machine with internet and pass its directory")


def build_perceptual(use_lpips=True, use_convnext=True, lpips_vgg_path=None, convnext_path=None):
    """The official perceptual loss with pretrained networks; None when both terms are off."""
    if not (use_lpips or use_convnext):
        return None
    return PerceptualLoss(build_lpips(lpips_vgg_path) if use_lpips else None,
                          build_convnext(convnext_path) if use_convnext else None)
