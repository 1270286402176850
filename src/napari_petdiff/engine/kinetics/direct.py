r"""Direct Patlak estimation from the dynamic sinograms: nested EM (Wang & Qi 2010), optional HQS prior.

Model: ``y_m ~ Poisson(A x_m + b_m)``, ``x_m = B_m0 Ki + B_m1 V`` with ``B_m = kappa D_m [u_m, v_m]``
(``D_m = int_frame exp(-lambda t) dt``: the frame images are decayed counts, see patlak.py).

One outer iteration: every frame's EM image ``x_m^EM = x_m / s * A^T (y_m / (A x_m + b_m))`` from
``x = B theta`` (one forward and one back projection of all frames, optionally on a view subset),
then ``inner`` image-domain EM iterations for theta on the surrogate
``sum_m s [x_m^EM log (B theta)_m - (B theta)_m]``:
``theta_k <- theta_k / sum_m B_mk * sum_m B_mk x_m^EM / (B theta)_m``. With one subset each outer
iteration increases the dynamic log-likelihood (tested).

With a prior (``prior`` != "none"), HQS on theta (methods.md 9.3, 9.6): before each outer iteration
the prior denoises the normalised maps at noise level t_n (decreasing), ``z = c Tweedie(...)``, and
the inner updates maximise the surrogate minus ``mu_k/2 ||theta_k - z_k||^2`` in closed form
(De Pierro's positive root, as ``PoissonLikelihood.em_prox``) with ``mu_k = weight / (sigma_bar_n^2 c_k^2)``
(the Gaussian of the denoiser's noise level in physical units), divided by the number of subsets
as each sub-iteration sees that fraction of the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..params import param, params_to_dict
from ..run import CancelToken, Intermediate, MethodGen, Progress, Result, RunWarning
from ..samplers.core import ORIENTATIONS, get_prior, orientations_used, prior_eps
from .frames import FrameModel
from .patlak import PatlakModelParams, fit_patlak, patlak_setup

_TINY = 1e-12


@dataclass
class PatlakDirectParams(PatlakModelParams):
    iterations: int = param(30, "outer nested-EM iterations (one EM update of every frame each)", min=1, max=5000)
    subsets: int = param(5, "view subsets per outer iteration (1 = monotone nested EM)", min=1, max=512)
    inner: int = param(5, "Patlak (image-domain EM) iterations per outer iteration", min=1, max=100)
    init_osem: int = param(1, "OSEM passes of the frames for the starting Ki / V (0 = uniform start)", min=0,
                           max=50, advanced=True)
    prior: str = param("brain-fdg-2d", "diffusion prior used through HQS ('none' = plain nested EM)")
    weight: float = param(1.0, "prior weight (1 = the denoiser's own noise level)", min=0.0, max=1e4)
    t_start: int = param(400, "first (largest) diffusion timestep of the HQS schedule", min=1, max=999,
                         advanced=True)
    seed: int = param(0, "random seed (diffusion noise)", min=0)
    orientation: str = param("xy", "3-D only: prior orientation(s)", choices=ORIENTATIONS, advanced=True)
    support_threshold: float = param(0.05, "support for the map scales: mean image > this x its max", min=0.0,
                                     max=0.9, advanced=True)


class NestedEM:
    """Nested EM for theta = (Ki, V) images given the frame model and the Patlak basis B (M, 2)."""

    def __init__(self, model: FrameModel, B: np.ndarray):
        self.model = model
        dev = model.device
        self.B = torch.as_tensor(B, dtype=torch.float32, device=dev)      # (M, 2)
        self.Bsum = self.B.sum(0)                                          # (2,)

    def frames(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.einsum("mk,k...->m...", self.B, theta)

    def value(self, theta: torch.Tensor) -> float:
        return float(self.model.value(self.frames(theta)).sum())

    def step(self, theta: torch.Tensor, subset, inner: int, z=None, mu=None) -> torch.Tensor:
        model = self.model
        x = self.frames(theta)
        x_em = model.em_step(x, subset)
        s = model.subset_sensitivity(subset)
        fov = model.fov
        b = s * self.Bsum.view(2, *([1] * (theta.ndim - 1)))              # (2, *img)
        for _ in range(inner):
            ratio = x_em / self.frames(theta).clamp_min(_TINY)
            back = torch.einsum("mk,m...->k...", self.B, ratio)
            if z is None:
                theta = theta * back / self.Bsum.view(2, *([1] * (theta.ndim - 1)))
            else:
                a = s * theta * back
                m = mu.view(2, *([1] * (theta.ndim - 1)))
                lin = b - m * z
                disc = (lin * lin + 4.0 * m * a).clamp_min(0).sqrt()
                # stable positive root of m th^2 + lin th - a = 0
                theta = torch.where(lin > 0, 2.0 * a / (lin + disc).clamp_min(_TINY), (disc - lin) / (2 * m))
            theta = torch.where(fov, theta.clamp_min(0), torch.zeros_like(theta))
        return theta


def run_patlak_direct(acq, params: PatlakDirectParams, cancel: CancelToken, device=None) -> MethodGen:
    warnings: list = []
    setup = patlak_setup(acq, params.t_star, params.timing, params.input_function, params.time_unit,
                         params.calibration, "counts", warn=warnings.append)
    for w in warnings:
        yield RunWarning(w)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    use_prior = params.prior.strip().lower() not in ("", "none")
    prior = None
    if use_prior:
        prior = get_prior(params.prior, dev)
        prior.check_grid(acq.grid, orientations_used(acq.grid, params.orientation))
    model = FrameModel(acq, setup.index, params.subsets, device=dev)
    B = setup.design * (setup.calibration * setup.decay_int_s)[:, None]
    nem = NestedEM(model, B)
    total = params.init_osem + params.iterations
    fov = model.fov
    shape = (2, *acq.grid.shape)
    # Start: voxel-wise fit of a short OSEM (positive floor: EM cannot leave zero) or uniform.
    if params.init_osem > 0:
        x = None
        for e, x in model.osem(params.init_osem, cancel):
            yield Progress(e, total, f"initial OSEM of {setup.n_frames} frames ({e}/{params.init_osem})", "init")
        ki0, v0 = fit_patlak(setup.to_concentration(x), setup, setup.weights)
        theta = torch.stack([ki0, v0])
    else:
        # half of the mean frame level from each basis function
        level = model.uniform_image().mean(0)
        theta = torch.stack([level / (2.0 * float(B[:, k].mean())) for k in range(2)])
    mean_img = theta[0].abs() + theta[1].abs()
    support = (mean_img > params.support_threshold * mean_img.max()) & fov
    c = torch.stack([theta[k][support].mean().clamp_min(_TINY) for k in range(2)]) if support.any() else \
        torch.ones(2, device=dev)
    if float(theta[0][support].mean()) <= 0:
        c[0] = c[1] * float(np.mean(setup.v / setup.u))
    theta = torch.maximum(theta, 0.05 * c.view(2, 1, 1, 1))
    theta = torch.where(fov, theta, torch.zeros(shape, device=dev))
    trace = [nem.value(theta)]
    sched = prior.schedule if prior is not None else None
    ts = np.linspace(params.t_start, 0, params.iterations).round().astype(int) if prior is not None else None
    gen = torch.Generator(device="cpu").manual_seed(int(params.seed))
    pad_gen = torch.Generator(device=dev).manual_seed(int(params.seed) + 7919)
    order = model.subset_order
    for it in range(params.iterations):
        cancel.raise_if_cancelled()
        z = mu = None
        if prior is not None:
            t = int(ts[it])
            ab = float(sched.alpha_bar[t])
            th_n = theta / c.view(2, 1, 1, 1)
            noise = torch.randn(th_n.shape, generator=gen).to(dev, th_n.dtype)
            x_t = math.sqrt(ab) * th_n + math.sqrt(1 - ab) * noise
            eps = prior_eps(prior, x_t, t, params.orientation, it, generator=pad_gen)
            z = ((x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp_min(0) * c.view(2, 1, 1, 1)
            mu = params.weight * ab / (1 - ab) / (c * c) / model.n_subsets
        for m in order:
            cancel.raise_if_cancelled()
            theta = nem.step(theta, m if model.n_subsets > 1 else None, params.inner, z, mu)
        trace.append(nem.value(theta))
        step = params.init_osem + it + 1
        yield Progress(step, total, f"nested EM iteration {it + 1}/{params.iterations}", "patlak-direct")
        yield Intermediate(theta[0].clone(), step, "Ki")
    meta = {"method": "patlak-direct", "params": params_to_dict(params), **setup.metadata(),
            "likelihood": "dynamic Poisson log-likelihood (sum over the frames used)",
            "map_scales": {"ki": float(c[0]), "intercept": float(c[1])}}
    if ts is not None:
        meta["timesteps"] = ts.tolist()
    return Result(mean=theta[0], extra={"intercept": theta[1]}, likelihood=trace, metadata=meta, warnings=warnings)
