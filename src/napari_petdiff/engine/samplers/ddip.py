r"""DDIP-HQS (Hashimoto & Gong 2025, after Chung & Ye's DDIP): the prior adapts to the scan.

Half-quadratic splitting of ``max_x L(y|x) + log p(x)`` with ``z ~ x``. Per reverse step t:

- z-step: the network's Tweedie image, in physical units ``z = c max(x0_theta(x_t), 0)``;
- x-step: J De Pierro EM-prox iterations from z, maximising ``L(x) - rho/2 ||x - z||^2`` in
  closed form (``PoissonLikelihood.em_prox``); optionally ``- beta R(x)`` with R the relative
  difference prior (``rdp_weight``), so that as rho -> 0 the x-step becomes MAP-RDP's and the
  prior's image is a pull on top of a handcrafted penalty, not the only regulariser;
- network step (steps with t_min <= t <= t_max): F Adam steps of the adapter (LoRA, decoder or
  full) on ``|| x0_theta(x_t) - x / c ||^2`` over the FOV. The target is an image, so the
  projector never enters autograd: that is the point of the splitting;
- DDIM from ``x / c`` with the adapted network's epsilon.

Units: ``rho`` is dimensionless, ``rho_j = rho s_j / c`` (s the sensitivity). Per voxel the
x-step then balances ``x_EM log x - x`` against ``rho/(2c) (x - z)^2``, so rho = 1 weighs the
pull like the data at a voxel of typical activity c, at every count level. ``rho_growth``
multiplies rho geometrically from the first to the last step (HQS raises its penalty).
``rdp_weight`` is relative to the mean sensitivity, as LiSch+SCD's (``beta = rdp_weight s_mean``).
Adapters restart from the shipped weights for every batch of samples (every new scan).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import param
from ..rdp import RDP
from .adapt import AdaptationParams, adapted_tweedie, make_adapter, random_slices
from .core import SamplingParams, run_sampler


@dataclass
class DDIPParams(AdaptationParams, SamplingParams):
    eta: float = param(0.85, "DDIM stochasticity (DDIP's default 0.85)", min=0.0, max=1.0)
    # 0.3: the sweep-best of benchmarks/ood.py at the low count level on both cases (0.1 at 6x the
    # counts; 1 and 3 never won)
    rho: float = param(0.3, "HQS weight pulling the x-step toward the network's image (dimensionless; larger "
                       "= closer to the prior)", min=0.0, max=1e4)
    rho_growth: float = param(1.0, "factor by which rho grows from the first to the last step", min=1e-3,
                              max=1e3, advanced=True)
    em_iterations: int = param(2, "EM-prox iterations of the x-step (J)", min=1, max=100)
    rdp_weight: float = param(0.0, "RDP penalty in the x-step (relative to the mean sensitivity, as LiSch+SCD's "
                              "adapter term); with rho -> 0 the x-step is MAP-RDP's", min=0.0, max=1e3)
    t_min: int = param(20, "adapt the network only at timesteps t >= t_min", min=0, max=999, advanced=True)
    t_max: int = param(980, "adapt the network only at timesteps t <= t_max", min=0, max=999, advanced=True)


def penalised_em_prox(lik, x, anchor, rho, rdp: RDP | None = None, beta: float = 0.0):
    """One x-step iteration: maximise the EM surrogate of L - rho/2 ||x - anchor||^2 - beta R(x).

    R is replaced by its separable quadratic expansion at x (gradient g, Nuyts' diagonal
    curvature c), which merges with the proximal quadratic into one: weight rho + beta c, anchor
    (rho anchor + beta (c x - g)) / (rho + beta c). So the closed form of ``em_prox`` still
    applies, and a fixed point is a stationary point of the penalised objective.
    """
    if rdp is None or beta == 0:
        return lik.em_prox(x, anchor, rho)
    c, g = rdp.curvature(x), rdp.gradient(x)
    w = rho + beta * c
    merged = (rho * anchor + beta * (c * x - g)) / w.clamp_min(1e-30)
    return lik.em_prox(x, merged, w)


def run_ddip(acq, params: DDIPParams, cancel, device=None):
    if params.t_min > params.t_max:
        raise ValueError(f"t_min ({params.t_min}) must not exceed t_max ({params.t_max})")
    slice_gen = torch.Generator().manual_seed(int(params.seed) + 104729)

    def make_dc(lik, c, cancel_token):
        s = lik.sensitivity.clamp_min(1e-12)
        fov = lik.fov
        rdp = RDP(acq.grid.voxel_size, is_2d=acq.grid.is_2d) if params.rdp_weight > 0 else None
        beta = params.rdp_weight * float(s[fov].mean()) if rdp is not None else 0.0

        def dc(z, x_t, state):
            frac = state.step / max(1, state.n_steps - 1)
            rho = params.rho * params.rho_growth ** frac * s / c
            u = z
            for _ in range(params.em_iterations):
                cancel_token.raise_if_cancelled()
                u = penalised_em_prox(lik, u, z, rho, rdp, beta)
            if params.t_min <= state.t <= params.t_max:
                ad = state.adapter
                idx = random_slices(x_t.shape[-3], params.fit_slices, slice_gen)
                target = torch.nan_to_num(u / c).detach()[:, idx]
                m = fov[idx].expand_as(target)

                def loss():
                    x0 = adapted_tweedie(ad, x_t, state.t, idx, state.generator, state.cond, state.guidance)
                    return ((x0 - target)[m] ** 2).mean()

                ad.fit(loss, params.fit_iterations, cancel_token)
                with torch.no_grad():
                    state.eps = state.eps_of(ad.prior, x_t)
            return u

        return dc

    return (yield from run_sampler(acq, params, cancel, device, "ddip-hqs", make_dc, adapt=make_adapter(params)))
