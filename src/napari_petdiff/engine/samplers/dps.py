r"""DPS (Chung et al., ICLR 2023) for PET: a comparison baseline.

The data enter only as a gradient step on the noisy iterate: after the DDIM update,
``x <- x - zeta * grad_{x_t} sqrt(2 KL(y || A c max(x0_hat(x_t), 0) + b))``, differentiating
through the network (the norm of the residual, as in DPS, becomes the square root of the
Poisson deviance). No projection onto the data: that is what DDS and LiSch add.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..likelihood import PoissonLikelihood
from ..params import param, params_to_dict
from ..run import Intermediate, Progress, Result, Sample
from .core import SamplingParams, get_prior, mr_condition, orientations_used, osem_scale, prior_eps


@dataclass
class DPSParams(SamplingParams):
    steps: int = param(100, "number of reverse diffusion steps", min=1, max=1000)
    zeta: float = param(1.0, "data step size (on the normalised noisy image)", min=0.0, max=1000.0)


def _deviance(lik: PoissonLikelihood, u: torch.Tensor) -> torch.Tensor:
    p = lik._full
    q = (p.system.forward_autograd(u) + p.b).clamp_min(1e-12)
    y = p.y
    t = torch.where(y > 0, y * (torch.log(y.clamp_min(1e-12)) - torch.log(q)), torch.zeros_like(q)) - y + q
    return 2 * t.sum(dim=tuple(range(q.ndim - y.ndim, q.ndim)))


def run_dps(acq, params: DPSParams, cancel, device=None):
    dev = torch.device(device) if device is not None else torch.device("cpu")
    prior = get_prior(params.prior, dev)
    prior.check_grid(acq.grid, orientations_used(acq.grid, params.orientation))
    cond = mr_condition(prior, acq, dev)
    lik = PoissonLikelihood(acq, 1, device=dev)
    c1, _ = osem_scale(lik, params.scale_threshold, cancel)
    sched = prior.schedule
    ts = sched.timesteps(params.steps)
    gen = torch.Generator().manual_seed(int(params.seed))
    pad_gen = torch.Generator(device=dev)
    pad_gen.manual_seed(int(params.seed) + 7919)
    outs, trace_all = [], []
    n_batches = -(-params.samples // params.batch)
    for b in range(n_batches):
        S = min(params.batch, params.samples - b * params.batch)
        c = c1.expand(S, 1, 1, 1)
        x = torch.randn((S, *acq.grid.shape), generator=gen).to(dev)
        trace = []
        for i, t in enumerate(ts):
            cancel.raise_if_cancelled()
            t_next = ts[i + 1] if i + 1 < len(ts) else -1
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                eps = prior_eps(prior, x, t, params.orientation, i, grad=True, generator=pad_gen, cond=cond,
                                guidance=params.guidance)
                x0 = sched.tweedie(x, eps, t)
                u = lik.mask(c * x0.clamp_min(0))
                dev_ = _deviance(lik, u)
                (g,) = torch.autograd.grad(dev_.clamp_min(1e-12).sqrt().sum(), x)
            noise = torch.randn(x.shape, generator=gen).to(dev) if params.eta > 0 else None
            # Non-negative x0 in the deterministic part, as the other samplers' DC steps give: an
            # early negative Tweedie estimate (amplified by 1/sqrt(alpha_bar) at large t) would
            # otherwise drag the whole trajectory below zero.
            x0_nn = lik.mask(x0.detach().clamp_min(0))
            x = sched.ddim_step(x0_nn, eps.detach(), t, t_next, params.eta, noise=noise) - params.zeta * g
            u = u.detach()
            trace.append(float(lik.value(u).mean()))
            done = b * len(ts) + i + 1
            yield Progress(done, n_batches * len(ts), f"dps: batch {b + 1}/{n_batches}, step {i + 1}", "dps")
            yield Intermediate(u.mean(0), done, "dps")
        n_done = sum(o.shape[0] for o in outs)
        for k in range(S):
            yield Sample(n_done + k, u[k])
        outs.append(u)
        trace_all.append(trace)
    samples = torch.cat(outs)
    std = samples.std(0, unbiased=True) if samples.shape[0] > 1 else None
    return Result(mean=samples.mean(0), std=std, samples=samples,
                  likelihood=[sum(v) / len(v) for v in zip(*trace_all)],
                  metadata={"method": "dps", "params": params_to_dict(params), "scale": float(c1.flatten()[0]),
                            "per_sample_likelihood": [float(v) for v in lik.value(samples)]})
