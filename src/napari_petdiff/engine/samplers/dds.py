r"""PET-DDS (Singh et al., MELBA 2024): K EM-preconditioned ascent steps from the Tweedie image.

Per reverse step, from z = c max(x0_hat, 0):
``u <- [u + (max(u, 1e-4)/s) (M grad L_m(u) + lambda (z - u) - beta_z grad R_z(u))]_+``,
K times, subsets in Herman-Meyer order. With lambda = 0, beta_z = 0 and one subset each
iteration is exactly an MLEM update from the Tweedie image.

Units (a deliberate change from Singh's code, whose lambda is in raw physical units and
changes meaning with dose): ``anchor`` is dimensionless, lambda_j = anchor * s_j / c, so
the update pulls u toward z by ``anchor * (u/c)`` of the gap per iteration at any count
level; likewise beta_z = rdpz * mean(s).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import param
from ..rdp import RDP
from .core import SamplingParams, run_sampler


@dataclass
class DDSParams(SamplingParams):
    dc_iterations: int = param(4, "EM-preconditioned data-consistency iterations per step (K)", min=0, max=200)
    subsets: int = param(1, "view subsets for the data-consistency iterations", min=1, max=512)
    anchor: float = param(0.0, "pull toward the denoised image per iteration (dimensionless lambda)", min=0.0,
                          max=100.0)
    rdpz: float = param(0.0, "3-D: axial RDP weight coupling slices (relative to mean sensitivity)", min=0.0)


def run_dds(acq, params: DDSParams, cancel, device=None):
    def make_dc(lik, c, cancel_token):
        s = lik.sensitivity.clamp_min(1e-12)
        rdpz = RDP(acq.grid.voxel_size, axial_only=True) if (params.rdpz > 0 and not acq.grid.is_2d) else None
        s_mean = float(lik.sensitivity[lik.fov].mean())
        counter = {"m": 0}
        M = lik.n_subsets

        def dc(z, x_t, state):
            u = z
            for _ in range(params.dc_iterations):
                cancel_token.raise_if_cancelled()
                m = lik.subset_order[counter["m"] % M] if M > 1 else None
                counter["m"] += 1
                g = M * lik.gradient(u, m) if m is not None else lik.gradient(u)
                if params.anchor > 0:
                    g = g + params.anchor * s / c * (z - u)
                if rdpz is not None:
                    g = g - params.rdpz * s_mean * rdpz.gradient(u)
                u = lik.mask((u + u.clamp_min(1e-4 * c) / s * g).clamp_min(0))
            return u

        return dc

    return (yield from run_sampler(acq, params, cancel, device, "dds", make_dc, n_subsets=params.subsets))
