r"""Indirect Patlak with a static-PET diffusion prior on the Ki and intercept maps (methods.md 9.4-9.6).

Both maps are divided by their mean over the support (the voxels where the mean frame image
exceeds ``support_threshold`` x its max) and go through the prior as two batch items
(2-D; 3-D volumes slice by slice, see ``samplers.core.prior_eps``).

Data term. After OSEM of the frames after t*, the Patlak least-squares objective of voxel j is
``1/2 ||C_j - P theta_j||^2_W = 1/2 (theta_j - theta_hat_j)^T P^T W P (theta_j - theta_hat_j) + const``
with the (W)LS fit ``theta_hat``. We divide it by the voxel's noise variance ``sigma_j^2``
(the WLS residual variance, smoothed spatially since each voxel has only M - 2 degrees of
freedom), so the data term is a noise-normalised (Mahalanobis) distance to the voxel-wise fit:
the prior weight ``weight`` is then dimensionless and the balance follows the dose by itself.

* RED-diff (9.5): minimise data term + weight * w(t) * stopgrad(eps(x_t, t) - eps)^T theta,
  x_t = sqrt(abar) theta + sqrt(1 - abar) eps, w(t) = sigma_t / alpha_t, t annealed linearly from
  ``t_start`` to ``t_end``. Optimiser: proximal gradient - an explicit step ``lr`` on the regulariser,
  then the exact prox of the quadratic data term (a 2 x 2 solve per voxel). Adam, as in the RED-diff
  paper, converged far too slowly here: the per-voxel (Ki, V) problem is ill conditioned (u and v
  are nearly collinear after t*), and Adam's per-coordinate scaling does not see that. One
  estimate (no posterior samples).
* HQS (9.6): alternate the z-step ``z = Tweedie(sqrt(abar) theta + sqrt(1 - abar) eps, t_n)`` (the prior
  denoises theta at noise level t_n) and the closed-form theta-step
  ``(H_j + mu I) theta_j = H_j theta_hat_j + mu z_j`` with ``mu = weight / sigma_bar_n^2``
  (``sigma_bar^2 = (1 - abar)/abar``, the denoiser's noise variance), t_n decreasing. Fresh noise at
  every step makes each run a sample: ``samples`` > 1 gives the mean and std of Ki.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..operators import GaussianPSF
from ..params import param, params_to_dict
from ..run import CancelToken, Intermediate, MethodGen, Progress, Result, RunWarning, Sample
from ..samplers.core import ORIENTATIONS, get_prior, orientations_used, prior_eps
from .patlak import PatlakParams, PatlakSetup, _setup_from, fit_matrix, reconstruct_frames


@dataclass
class PriorFields:
    prior: str = param("brain-fdg-2d", "diffusion prior: a shipped name (petdiff priors) or a .safetensors path")
    weight: float = param(1.0, "prior weight relative to the noise-normalised Patlak data term", min=0.0,
                          max=1e4)
    seed: int = param(0, "random seed (diffusion noise)", min=0)
    orientation: str = param("xy", "3-D only: xy slices, 'all' three orientations averaged, or 'cycle' one per "
                             "step", choices=ORIENTATIONS, advanced=True)
    support_threshold: float = param(0.05, "support (for the map scales): mean frame image > this x its max",
                                     min=0.0, max=0.9, advanced=True)
    noise_fwhm: float = param(8.0, "smoothing of the voxel noise-variance map", min=0.0, max=100.0, unit="mm",
                              advanced=True)


@dataclass
class PatlakREDParams(PriorFields, PatlakParams):
    steps: int = param(60, "RED-diff iterations (one network call each)", min=1, max=5000)
    lr: float = param(1.0, "step size of the regulariser gradient (normalised map units)", min=1e-4, max=100.0,
                      advanced=True)
    momentum: float = param(0.9, "averaging of the noisy regulariser gradient over steps (0 = none)", min=0.0,
                            max=0.999, advanced=True)
    t_start: int = param(600, "first (largest) diffusion timestep", min=1, max=999, advanced=True)
    t_end: int = param(100, "last (smallest) diffusion timestep", min=0, max=999, advanced=True)


@dataclass
class PatlakHQSParams(PriorFields, PatlakParams):
    steps: int = param(25, "HQS iterations (one network call each), t decreasing", min=1, max=1000)
    t_start: int = param(600, "first (largest) diffusion timestep", min=1, max=999, advanced=True)
    samples: int = param(1, "posterior samples (mean and std of Ki come from them)", min=1, max=64)


class PatlakDataTerm:
    """Noise-normalised Patlak data term in normalised map units (theta / c)."""

    def __init__(self, conc: torch.Tensor, setup: PatlakSetup, fov: torch.Tensor, grid, support_threshold: float,
                 noise_fwhm_mm: float):
        if setup.n_frames <= 2:
            raise ValueError("the prior-based Patlak methods need >= 3 frames after t* (the residual variance "
                             "sets the data weight); lower t*")
        dt, dev = conc.dtype, conc.device
        W = setup.weights
        P = setup.design
        G = torch.as_tensor(fit_matrix(setup, W), dtype=dt, device=dev)
        theta = torch.einsum("km,m...->k...", G, conc)
        Pt = torch.as_tensor(P, dtype=dt, device=dev)
        resid = conc - torch.einsum("mk,k...->m...", Pt, theta)
        wt = torch.as_tensor(W, dtype=dt, device=dev).view(-1, *([1] * (conc.ndim - 1)))
        s2 = (wt * resid ** 2).sum(0) / (setup.n_frames - 2)
        if noise_fwhm_mm > 0:
            f = (0.0 if grid.is_2d else noise_fwhm_mm, noise_fwhm_mm, noise_fwhm_mm)
            s2 = GaussianPSF(grid, f).apply(s2)
        mean_img = conc.mean(0)
        support = (mean_img > support_threshold * mean_img.max()) & fov
        if not support.any():
            raise ValueError("the mean frame image is empty: cannot define the support for the map scales")
        floor = 1e-3 * float(s2[support].median().clamp_min(1e-30))
        self.prec = torch.where(fov, 1.0 / s2.clamp_min(floor), torch.zeros_like(s2))
        c = torch.stack([theta[k][support].mean() for k in range(2)])
        if float(c[0]) <= 0:
            raise ValueError("the voxel-wise Ki is not positive on average over the support: the data do not show "
                             "irreversible uptake after t* (check t*, the input function and its time unit)")
        if float(c[1]) <= 0:
            c[1] = c[0] * float(np.mean(setup.u / setup.v))  # keep the intercept map on a comparable scale
        self.c = c
        self.fov, self.support = fov, support
        Pc = Pt * c.view(1, 2)
        self.Q = (Pc.T * torch.as_tensor(W, dtype=dt, device=dev)) @ Pc   # 2 x 2, normalised units
        self.theta_hat = theta / c.view(2, *([1] * (theta.ndim - 1)))
        self.theta_ls = theta

    def grad(self, th: torch.Tensor) -> torch.Tensor:
        """Gradient of the data term at normalised maps ``th`` (..., 2, z, y, x)."""
        d = th - self.theta_hat
        g0 = self.Q[0, 0] * d[..., 0, :, :, :] + self.Q[0, 1] * d[..., 1, :, :, :]
        g1 = self.Q[1, 0] * d[..., 0, :, :, :] + self.Q[1, 1] * d[..., 1, :, :, :]
        return torch.stack([g0, g1], dim=-4) * self.prec

    def prox(self, z: torch.Tensor, mu: float) -> torch.Tensor:
        """argmin data(th) + mu/2 ||th - z||^2, per voxel (2 x 2 solve)."""
        p = self.prec
        a = p * self.Q[0, 0] + mu
        b = p * self.Q[0, 1]
        d = p * self.Q[1, 1] + mu
        th = self.theta_hat
        r0 = p * (self.Q[0, 0] * th[0] + self.Q[0, 1] * th[1]) + mu * z[..., 0, :, :, :]
        r1 = p * (self.Q[1, 0] * th[0] + self.Q[1, 1] * th[1]) + mu * z[..., 1, :, :, :]
        det = a * d - b * b
        out = torch.stack([(d * r0 - b * r1) / det, (a * r1 - b * r0) / det], dim=-4)
        return torch.where(self.fov, out, torch.zeros_like(out))



def _prepare(acq, params, cancel, device, name, total_steps, warnings):
    setup = _setup_from(acq, params, "counts", warnings)
    if setup.n_frames <= 2:
        raise ValueError(f"{name} needs >= 3 frames after t* (the residual variance sets the data weight); "
                         f"t* = {params.t_star} min leaves {setup.n_frames}. Lower t*.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    prior = get_prior(params.prior, dev)
    prior.check_grid(acq.grid, orientations_used(acq.grid, params.orientation))
    total = params.iterations + total_steps
    conc, model = yield from reconstruct_frames(acq, setup, params, cancel, dev, total=total)
    data = PatlakDataTerm(conc, setup, model.fov, acq.grid, params.support_threshold, params.noise_fwhm)
    return setup, prior, data, dev, total


def _maps_eps(prior, th: torch.Tensor, t: int, orientation: str, step: int, generator) -> torch.Tensor:
    """th (..., 2, z, y, x) -> eps of the same shape; each map is one volume for the prior."""
    shape = th.shape
    flat = th.reshape(-1, *shape[-3:])
    return prior_eps(prior, flat, t, orientation, step, generator=generator).reshape(shape)


class _Noiser:
    """Seeded forward noising of the (normalised) maps and the prior's epsilon for them."""

    def __init__(self, prior, params, dev):
        self.prior, self.orientation = prior, params.orientation
        self.gen = torch.Generator(device="cpu").manual_seed(int(params.seed))
        self.pad_gen = torch.Generator(device=dev).manual_seed(int(params.seed) + 7919)

    def __call__(self, th: torch.Tensor, t: int, step: int):
        """(x_t, noise, eps, alpha_bar_t) for maps th at timestep t."""
        ab = float(self.prior.schedule.alpha_bar[int(t)])
        noise = torch.randn(th.shape, generator=self.gen).to(th.device, th.dtype)
        x_t = math.sqrt(ab) * th + math.sqrt(1 - ab) * noise
        return x_t, noise, _maps_eps(self.prior, x_t, int(t), self.orientation, step, self.pad_gen), ab


def _finish(name, params, setup, data, th_samples, warnings, extra_meta) -> Result:
    ph = th_samples * data.c.view(1, 2, 1, 1, 1)
    fov = data.fov
    ph = torch.where(fov, ph, torch.zeros_like(ph))
    ki_s, v_s = ph[:, 0].clamp_min(0), ph[:, 1]
    ki, v = ki_s.mean(0), v_s.mean(0)
    extra = {"intercept": v}
    std = None
    if ki_s.shape[0] > 1:
        std = ki_s.std(0, unbiased=True)
        extra["ki_std"] = std
    meta = {"method": name, "params": params_to_dict(params), **setup.metadata(),
            "map_scales": {"ki": float(data.c[0]), "intercept": float(data.c[1])}, **extra_meta}
    return Result(mean=ki, std=std, samples=ki_s if ki_s.shape[0] > 1 else None, extra=extra, metadata=meta,
                  warnings=warnings)


def run_patlak_red_diff(acq, params: PatlakREDParams, cancel: CancelToken, device=None) -> MethodGen:
    warnings: list = []
    if params.t_end > params.t_start:
        raise ValueError(f"t_end ({params.t_end}) must not exceed t_start ({params.t_start}): t descends")
    setup, prior, data, dev, total = yield from _prepare(acq, params, cancel, device, "patlak-red-diff",
                                                         params.steps, warnings)
    for w in warnings:
        yield RunWarning(w)
    noiser = _Noiser(prior, params, dev)
    ts = np.linspace(params.t_start, params.t_end, params.steps).round().astype(int)
    th = data.theta_hat.clamp_min(0)
    th = torch.where(data.fov, th, torch.zeros_like(th))
    m = None
    for i, t in enumerate(ts):
        cancel.raise_if_cancelled()
        x_t, noise, eps, ab = noiser(th, t, i)
        g_reg = params.weight * math.sqrt((1 - ab) / ab) * (eps - noise)
        # one noise draw per step makes g_reg noisy: average it (Adam's first moment, bias corrected)
        m = g_reg if m is None else params.momentum * m + (1 - params.momentum) * g_reg
        g = m / (1 - params.momentum ** (i + 1)) if params.momentum > 0 else g_reg
        # proximal gradient: explicit step on the regulariser, exact prox of the quadratic data term
        th = data.prox(th - params.lr * g, 1.0 / params.lr).clamp_min(0)
        step = params.iterations + i + 1
        yield Progress(step, total, f"RED-diff iteration {i + 1}/{params.steps} (t = {int(t)})", "patlak-red-diff")
        if i % 10 == 0 or i + 1 == len(ts):
            yield Intermediate(th[0] * data.c[0], step, "Ki")
    return _finish("patlak-red-diff", params, setup, data, th[None], warnings, {"timesteps": ts.tolist()})


def run_patlak_hqs(acq, params: PatlakHQSParams, cancel: CancelToken, device=None) -> MethodGen:
    warnings: list = []
    setup, prior, data, dev, total = yield from _prepare(acq, params, cancel, device, "patlak-hqs",
                                                         params.steps, warnings)
    for w in warnings:
        yield RunWarning(w)
    noiser = _Noiser(prior, params, dev)
    ts = np.linspace(params.t_start, 0, params.steps).round().astype(int)
    S = params.samples
    th = data.theta_hat.clamp_min(0).expand(S, *data.theta_hat.shape).clone()
    for i, t in enumerate(ts):
        cancel.raise_if_cancelled()
        x_t, noise, eps, ab = noiser(th, t, i)
        z = ((x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp_min(0)
        th = data.prox(z, params.weight * ab / (1 - ab))
        step = params.iterations + i + 1
        yield Progress(step, total, f"HQS iteration {i + 1}/{params.steps} (t = {int(t)})", "patlak-hqs")
        if i % 5 == 0 or i + 1 == len(ts):
            yield Intermediate(th[:, 0].mean(0) * data.c[0], step, "Ki")
    for k in range(S):
        yield Sample(k, th[k, 0] * data.c[0])
    res = _finish("patlak-hqs", params, setup, data, th, warnings, {"timesteps": ts.tolist()})
    if S == 1:
        res.warnings.append("one posterior sample: no Ki uncertainty (ki_std) map; use samples >= 2")
    return res
