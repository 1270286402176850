r"""PET-LiSch with steerable conditional diffusion (Webber et al., NSS/MIC 2025; SCD of Barbano et al.).

LiSch's likelihood-scheduled data consistency is unchanged; on top, adapters on the network
(LoRA by default) are fitted while sampling so that the network's own Tweedie estimate explains
the data: at every ``adapt_every``-th step and the last ``adapt_last`` steps, F Adam steps
maximise ``L(c max(x0_{theta+Delta}(x_t), 0))`` (loss (b) of methods.md 6.2: the raw Tweedie
estimate, so no backpropagation through the DC step), optionally minus a small RDP term. The
likelihood's gradient ``A^T(y / ybar) - s`` is computed outside autograd and fed back as the
gradient of the image, so the projector never enters the graph.

As in SCD, the DDIM noise direction uses the unadapted network's epsilon; the adapters persist
across steps and restart for every batch of samples (every new scan).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import param
from ..rdp import RDP
from .adapt import AdaptationParams, adapted_tweedie, make_adapter, random_slices
from .core import prior_eps, run_sampler
from .lisch import LiSchParams, attach_targets, lisch_setup


@dataclass
class LiSchSCDParams(AdaptationParams, LiSchParams):
    lr: float = param(3e-4, "Adam learning rate of the adaptation (SCD's 3e-4)", min=1e-7, max=1.0)
    adapt_every: int = param(5, "adapt the network at every k-th diffusion step", min=1, max=1000)
    adapt_last: int = param(4, "the last steps (smallest noise) are always adapted", min=0, max=1000,
                            advanced=True)
    rdp_weight: float = param(0.0, "small RDP smoothness term in the adaptation loss (relative to the mean "
                              "sensitivity)", min=0.0, max=1e3, advanced=True)


def is_adapted_step(i: int, n: int, every: int, last: int) -> bool:
    return i % every == 0 or i >= n - last


def run_lisch_scd(acq, params: LiSchSCDParams, cancel, device=None):
    curve, targets, make_dc = lisch_setup(acq, params, cancel, device)
    slice_gen = torch.Generator().manual_seed(int(params.seed) + 104729)
    rdp = RDP(acq.grid.voxel_size, is_2d=acq.grid.is_2d) if params.rdp_weight > 0 else None

    def predict(x_t, state):
        ad, lik, c, t = state.adapter, state.lik, state.scale, state.t
        with torch.no_grad(), ad.base() as base:
            eps0 = state.eps_of(base, x_t)
        if is_adapted_step(state.step, state.n_steps, params.adapt_every, params.adapt_last):
            idx = random_slices(x_t.shape[-3], params.fit_slices, slice_gen)
            whole = len(idx) == x_t.shape[-3]
            fov = lik.fov
            s_mean = float(lik.sensitivity[fov].mean())
            if not whole:  # the other slices enter the likelihood at their current estimate
                with torch.no_grad():
                    eps_all = prior_eps(ad.prior, x_t, t, "xy", state.step, generator=state.generator,
                                        cond=state.cond, guidance=state.guidance)
                    u_all = lik.mask(c * ad.prior.schedule.tweedie(x_t, eps_all, t).clamp_min(0))

            def loss():
                x0 = adapted_tweedie(ad, x_t, t, idx, state.generator, state.cond, state.guidance)
                u_sub = torch.where(fov[idx], c * x0.clamp_min(0), torch.zeros_like(x0))
                u = u_sub.detach() if whole else u_all.index_copy(1, idx, u_sub.detach())
                val, g = lik.value_and_gradient(u)
                if rdp is not None:
                    val = val - params.rdp_weight * s_mean * rdp.value(u)
                    g = g - params.rdp_weight * s_mean * rdp.gradient(u)
                g = g[:, idx]
                norm = float((lik.sensitivity[idx] * u_sub.detach()).sum().clamp_min(1.0))
                # d(surrogate)/d(u_sub) = -grad(objective); its value shifted to -objective for the log
                surrogate = -(g * u_sub).sum() / norm
                return surrogate - surrogate.detach() - float(val.sum()) / norm

            ad.fit(loss, params.fit_iterations, cancel)
        with torch.no_grad():
            eps = state.eps_of(ad.prior, x_t)
        return eps, eps0

    result = yield from run_sampler(acq, params, cancel, device, "lisch-scd", make_dc,
                                    adapt=make_adapter(params), predict=predict)
    return attach_targets(result, curve, targets)
