"""Training-set augmentation on the device: flip, small rotation and crop, colour jitter."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a float batch in [0, 1], N x 3 x H x W; returns a new tensor."""
    n = x.shape[0]
    if n == 0:
        return x
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        # Drawn where the generator lives (the batch's device in training): no host-to-device copy.
        return (torch.rand(n, generator=generator, device=generator.device) * (hi - lo) + lo).to(dev)

    # One affine warp does flip, rotation (±10°), zoom (0.9-1.1x) and shift (±6%) together.
    angle = uniform(-10, 10) * (math.pi / 180)
    scale = uniform(0.9, 1.1)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, uniform(-0.06, 0.06)], dim=1),
        torch.stack([sin * flip, cos, uniform(-0.06, 0.06)], dim=1),
    ], dim=1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # Colour jitter: brightness and contrast ±20%, saturation ±20%.
    brightness = uniform(0.8, 1.2).view(n, 1, 1, 1).to(x.dtype)
    contrast = uniform(0.8, 1.2).view(n, 1, 1, 1).to(x.dtype)
    saturation = uniform(0.8, 1.2).view(n, 1, 1, 1).to(x.dtype)
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * saturation + gray
    return x.clamp_(0, 1)
