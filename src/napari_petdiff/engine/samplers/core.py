"""Sampler core shared by every diffusion reconstruction method.

One loop (``run_sampler``): network epsilon -> Tweedie x0 -> physical units ``z = c max(x0, 0)``
-> a method's data-consistency step ``u = dc(z, ...)`` -> back to normalised units -> DDIM
with the data-consistent x0 in the deterministic part and the network's epsilon in the noise
direction (the "decomposed" sampler of DDS). S posterior samples run as one batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..classical import osem_epochs
from ..likelihood import PoissonLikelihood
from ..params import param, params_to_dict
from ..run import CancelToken, Intermediate, Progress, Result, RunWarning, Sample

ORIENTATIONS = ("xy", "all", "cycle")


@dataclass
class SamplingParams:
    """Fields shared by every diffusion sampler (each method's Params inherits them)."""
    prior: str = param("brain-fdg-2d", "diffusion prior: a shipped name (petdiff priors) or a .safetensors path")
    steps: int = param(50, "number of reverse diffusion steps", min=1, max=1000)
    eta: float = param(0.1, "DDIM stochasticity (0 = deterministic, 1 = DDPM-like)", min=0.0, max=1.0)
    samples: int = param(1, "posterior samples (mean and std come from them)", min=1, max=256)
    batch: int = param(4, "samples computed together (memory vs speed)", min=1, max=256, advanced=True)
    seed: int = param(0, "random seed (initial noise and DDIM noise)", min=0)
    orientation: str = param("xy", "3-D only: xy slices, 'all' three orientations averaged, or 'cycle' one per "
                             "step", choices=ORIENTATIONS, advanced=True)
    scale_threshold: float = param(0.05, "support of the OSEM image used for the scale c (fraction of its max)",
                                   min=0.0, max=0.9, advanced=True)
    guidance: float = param(0.0, "MR-conditioned priors: classifier-free guidance weight w (0 = the plain "
                            "conditional prediction)", min=0.0, max=20.0, advanced=True)


_PRIOR_CACHE: dict = {}
_PRIOR_STAMPS: dict = {}  # key -> the files' (path, size, mtimes) when cached


def get_prior(name: str, device):
    from ..diffusion.io import load_prior, prior_stamp

    key = (name, str(device))
    hit = _PRIOR_CACHE.get(key)
    try:
        stamp = prior_stamp(name)
    except (ValueError, FileNotFoundError):
        if hit is not None:
            return hit  # placed in the cache in memory (tests, embedding applications)
        raise
    # a prior re-exported (or damaged) at the same path since it was cached is read again
    if hit is None or _PRIOR_STAMPS.get(key) != stamp:
        if len(_PRIOR_CACHE) > 4:
            _PRIOR_CACHE.clear()
        _PRIOR_CACHE[key] = load_prior(name, device=device)
        _PRIOR_STAMPS[key] = stamp
    return _PRIOR_CACHE[key]


def image_scale(x: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Mean of x over its support {x > threshold * max}: the per-image scale c (Singh's rule)."""
    mx = x.amax(dim=(-3, -2, -1), keepdim=True)
    supp = x > threshold * mx
    n = supp.sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1)
    return torch.where(supp, x, torch.zeros_like(x)).sum(dim=(-3, -2, -1), keepdim=True) / n


def osem_scale(lik: PoissonLikelihood, threshold: float, cancel: Optional[CancelToken]) -> torch.Tensor:
    """Scale from one OSEM pass with ~8 subsets: smooth enough that noise spikes do not set c."""
    n_views = lik.acq.geometry.n_views
    sub = lik if lik.n_subsets > 1 else PoissonLikelihood(lik.acq, max(1, min(8, n_views)), device=lik.device)
    x = None
    for _, x in osem_epochs(sub, 1, cancel):
        pass
    c = image_scale(x, threshold)
    if float(c.min()) <= 0:
        raise ValueError("the OSEM image is zero: the scale of the data cannot be estimated")
    return c, x


def orientations_used(grid, orientation: str) -> tuple:
    return ("xy",) if grid.shape[0] == 1 or orientation == "xy" else ("xy", "xz", "yz")


def mr_condition(prior, acq, device) -> Optional[torch.Tensor]:
    """The acquisition's MR as the conditioning volume (1, nz, ny, nx) of an MR-conditioned prior."""
    if not getattr(prior, "cond_channels", 0):
        return None
    mr = getattr(acq, "mr", None)
    if mr is None:
        raise ValueError(f"prior {prior.name!r} is MR-conditioned but the acquisition has no MR image: attach the "
                         "aligned T1 (acquisition.with_mr(mr), `petdiff recon --mr MR.nii.gz`, or the MR layer in "
                         "napari), or pick an unconditional prior")
    mr = torch.as_tensor(mr, dtype=torch.float32, device=device)
    if tuple(mr.shape) != tuple(acq.grid.shape):
        raise ValueError(f"the MR image has shape {tuple(mr.shape)} but the reconstruction grid is "
                         f"{tuple(acq.grid.shape)}: resample the MR to the PET grid")
    return mr[None]


def prior_eps(prior, x: torch.Tensor, t: int, orientation: str, step: int, grad: bool = False,
              generator=None, cond: Optional[torch.Tensor] = None, guidance: float = 0.0) -> torch.Tensor:
    """Epsilon for a batch of volumes (S, nz, ny, nx) along the chosen orientation(s).

    'all' averages the three orientations (equivalently their Tweedie images: the map is affine
    in epsilon); 'cycle' uses one orientation per step (1 network call per step). ``cond``: the
    MR volume (1 or S, nz, ny, nx) of an MR-conditioned prior, with guidance weight ``guidance``.
    """
    kw = {"grad": grad, "generator": generator}
    if cond is not None:
        kw.update(cond=cond.expand_as(x), guidance=guidance)
    if x.shape[-3] == 1 or orientation == "xy":
        return prior.eps_volume(x, t, orientation="xy", **kw)
    if orientation == "all":
        return sum(prior.eps_volume(x, t, orientation=o, **kw) for o in ("xy", "xz", "yz")) / 3.0
    return prior.eps_volume(x, t, orientation=("xy", "xz", "yz")[step % 3], **kw)


@dataclass
class SamplerState:
    step: int
    n_steps: int
    t: int
    t_next: int
    scale: torch.Tensor          # (S, 1, 1, 1)
    lik: PoissonLikelihood
    warn: Callable[[str], None]
    x_t: Optional[torch.Tensor] = None      # the current noisy iterate (normalised units)
    adapter: Optional[object] = None         # samplers.adapt.NetworkAdapter of an adapting method
    eps: Optional[torch.Tensor] = None       # DDIM noise direction; a DC step may replace it
    orientation: str = "xy"
    generator: Optional[torch.Generator] = None  # seeded padding noise of the network calls
    cond: Optional[torch.Tensor] = None      # MR volume (1, nz, ny, nx) of an MR-conditioned prior
    guidance: float = 0.0

    def eps_of(self, prior, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """The network's epsilon for this step (orientation, MR conditioning and seeding applied)."""
        return prior_eps(prior, x, self.t, self.orientation, self.step, grad=grad, generator=self.generator,
                         cond=self.cond, guidance=self.guidance)


DCFunction = Callable[[torch.Tensor, torch.Tensor, SamplerState], torch.Tensor]
# predict(x_t, state) -> (eps for the Tweedie estimate, eps for the DDIM noise direction)
PredictFunction = Callable[[torch.Tensor, SamplerState], tuple]


def run_sampler(acq, params: SamplingParams, cancel: CancelToken, device, method: str,
                make_dc: Callable[[PoissonLikelihood, torch.Tensor, CancelToken], DCFunction],
                n_subsets: int = 1, adapt: Optional[Callable] = None, predict: Optional[PredictFunction] = None):
    """Generic posterior sampler; ``make_dc(lik, c, cancel)`` returns the method's DC step.

    ``adapt(prior)`` returns a NetworkAdapter (methods that fine-tune the network while sampling):
    the sampler then uses the adapter's private copy, restarted for every sample batch.
    ``predict`` replaces the single network call of a step (SCD: adapted and unadapted eps).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if acq.is_dynamic:
        raise ValueError(f"{method} reconstructs static data; pick a frame (acquisition.frame(k)) or use Patlak")
    prior = get_prior(params.prior, dev)
    prior.check_grid(acq.grid, orientations_used(acq.grid, params.orientation))
    cond = mr_condition(prior, acq, dev)
    adapter = adapt(prior) if adapt is not None else None
    if adapter is not None:
        prior = adapter.prior
    lik = PoissonLikelihood(acq, n_subsets, device=dev)
    yield Progress(0, params.steps, "estimating the image scale (1 OSEM pass)", "scale")
    c1, _ = osem_scale(lik, params.scale_threshold, cancel)
    sched = prior.schedule
    ts = sched.timesteps(params.steps)
    shape = tuple(acq.grid.shape)
    fov = lik.fov
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(params.seed))
    # Padding noise for slices smaller than the prior (3-D xz/yz) must be seeded too.
    pad_gen = torch.Generator(device=dev)
    pad_gen.manual_seed(int(params.seed) + 7919)
    warned: set = set()
    warnings: list = []

    def warn(msg: str) -> None:
        if msg not in warned:
            warned.add(msg)
            warnings.append(msg)

    outputs, traces, per_sample_ll = [], [], []
    n_batches = math.ceil(params.samples / params.batch)
    total = n_batches * params.steps
    for b in range(n_batches):
        S = min(params.batch, params.samples - b * params.batch)
        c = c1.expand(S, 1, 1, 1).clone()
        dc = make_dc(lik, c, cancel)
        if adapter is not None:
            adapter.restart()  # every batch of samples starts from the shipped network
        x = torch.randn((S, *shape), generator=gen).to(dev)
        u = None
        trace = []
        for i, t in enumerate(ts):
            cancel.raise_if_cancelled()
            t_next = ts[i + 1] if i + 1 < len(ts) else -1
            state = SamplerState(i, len(ts), t, t_next, c, lik, warn, x_t=x, adapter=adapter,
                                 orientation=params.orientation, generator=pad_gen, cond=cond,
                                 guidance=params.guidance)
            if predict is not None:
                eps, state.eps = predict(x, state)
            else:
                eps = state.eps = state.eps_of(prior, x)
            x0 = sched.tweedie(x, eps, t)
            z = torch.where(fov, c * x0.clamp_min(0), torch.zeros_like(x0))
            n_warn = len(warnings)
            u = dc(z, x, state)
            for w in warnings[n_warn:]:
                yield RunWarning(w)
            x0_dc = torch.nan_to_num(u / c)
            noise = torch.randn(x.shape, generator=gen).to(dev) if params.eta > 0 else None
            x = sched.ddim_step(x0_dc, state.eps, t, t_next, params.eta, noise=noise)
            ll = lik.value(u)
            trace.append(float(ll.mean()))
            done = b * params.steps + i + 1
            yield Progress(done, total, f"{method}: sample batch {b + 1}/{n_batches}, step {i + 1}/{len(ts)}",
                           method)
            yield Intermediate(u.mean(dim=0), done, method)
        u = lik.mask(u.clamp_min(0))
        n_done = sum(o.shape[0] for o in outputs)
        for k in range(S):
            yield Sample(n_done + k, u[k])
        outputs.append(u)
        traces.append(trace)
        per_sample_ll.extend(float(v) for v in lik.value(u))
    samples = torch.cat(outputs, dim=0)
    mean = samples.mean(dim=0)
    std = samples.std(dim=0, unbiased=True) if samples.shape[0] > 1 else None
    if std is None:
        warnings.append("one posterior sample: no uncertainty (std) map; use samples >= 2")
    trace = [sum(v) / len(v) for v in zip(*traces)]
    return Result(mean=mean, std=std, samples=samples, likelihood=trace, warnings=warnings,
                  metadata={"method": method, "params": params_to_dict(params),
                            "scale": float(c1.flatten()[0]), "per_sample_likelihood": per_sample_ll,
                            "prior": prior.card.get("name", params.prior) if hasattr(prior, "card") else params.prior,
                            "timesteps": ts, "mr_conditioned": cond is not None,
                            **({"adaptation_losses": adapter.losses, "adapted_parameters": adapter.num_trainable()}
                               if adapter is not None else {})})


def check_samples(params) -> None:
    if params.samples < 1:
        raise ValueError("samples must be >= 1: a diffusion reconstruction returns at least one posterior sample")
