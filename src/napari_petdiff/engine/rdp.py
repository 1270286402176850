r"""Relative difference prior (RDP).

``R(x) = 1/2 sum_j sum_{k in N_j} w_jk (x_j - x_k)^2 / (x_j + x_k + gamma |x_j - x_k| + eps)``
over the 8- (2-D) or 26- (3-D) neighbourhood; ``w_jk`` = (smallest voxel size) / distance, so
anisotropic voxels are weighted by physical distance. Each unordered pair appears twice in
the double sum, hence the 1/2. ``axial_only`` keeps the two z neighbours (RDP-z).
"""
from __future__ import annotations

import itertools
import math

import torch


def neighbourhood(voxel_size, is_2d: bool, axial_only: bool = False):
    if axial_only:
        offs = [(1, 0, 0), (-1, 0, 0)]
    else:
        rng_z = (0,) if is_2d else (-1, 0, 1)
        offs = [o for o in itertools.product(rng_z, (-1, 0, 1), (-1, 0, 1)) if o != (0, 0, 0)]
    vmin = min(voxel_size)
    weights = [vmin / math.sqrt(sum((o_i * v) ** 2 for o_i, v in zip(o, voxel_size))) for o in offs]
    return offs, weights


def _shift(x: torch.Tensor, o) -> torch.Tensor:
    """x shifted so that out[j] = x[j + o], edges replicated (no pull across the border)."""
    out = x
    for axis, s in zip((-3, -2, -1), o):
        if s == 0:
            continue
        n = out.shape[axis]
        idx = torch.arange(n, device=x.device) + s
        idx = idx.clamp(0, n - 1)
        out = out.index_select(axis, idx)
    return out


class RDP:
    def __init__(self, voxel_size=(2.0, 2.0, 2.0), gamma: float = 2.0, eps: float = 1e-9, is_2d: bool = True,
                 axial_only: bool = False):
        if gamma < 0:
            raise ValueError(f"RDP gamma must be >= 0; got {gamma}")
        self.gamma, self.eps = float(gamma), float(eps)
        self.offsets, self.weights = neighbourhood(voxel_size, is_2d, axial_only)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(x.shape[:-3], dtype=torch.float64, device=x.device)
        for o, w in zip(self.offsets, self.weights):
            xn = _shift(x, o)
            d = x - xn
            den = x + xn + self.gamma * d.abs() + self.eps
            total = total + 0.5 * w * (d * d / den).double().sum(dim=(-3, -2, -1))
        return total

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        # Both orderings of a pair contribute to voxel j: d/dx_j of the pair term is
        # d (x_j + 3 x_k + gamma|d|) / den^2; the 1/2 cancels against the two orderings.
        g = torch.zeros_like(x)
        for o, w in zip(self.offsets, self.weights):
            xn = _shift(x, o)
            d = x - xn
            den = x + xn + self.gamma * d.abs() + self.eps
            g = g + w * d * (x + 3 * xn + self.gamma * d.abs()) / (den * den)
        return g

    def curvature(self, x: torch.Tensor) -> torch.Tensor:
        """Diagonal curvature surrogate (Nuyts): sum_k w 2 x_k^2 ... bounded, used as preconditioner."""
        c = torch.zeros_like(x)
        for o, w in zip(self.offsets, self.weights):
            xn = _shift(x, o)
            d = x - xn
            den = x + xn + self.gamma * d.abs() + self.eps
            c = c + w * 8 * xn * xn / den ** 3
        return c
