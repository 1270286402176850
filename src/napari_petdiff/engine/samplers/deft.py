r"""PET-DEFT sampling: DDIM with ``eps_hat = eps_prior + h(x_t, x0, g)`` and no separate DC step.

The h-network (engine.diffusion.deft) has learnt the data consistency: at every step it reads the
prior's non-negative Tweedie estimate and the EM-preconditioned Poisson gradient there (one
forward and one back projection per step), so a few steps (5-50) suffice. The final image is
clamped at zero by the sampler core; posterior samples come from eta > 0 and different seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.deft import DEFAULT_DEFT, guidance_image, h_volume, load_deft
from ..params import param
from .core import SamplingParams, check_samples, get_prior, run_sampler


@dataclass
class DEFTParams(SamplingParams):
    network: str = param(DEFAULT_DEFT, "DEFT h-network: a shipped name or a .safetensors path from "
                         "`petdiff train-deft` (it must match the prior)")
    steps: int = param(20, "number of reverse diffusion steps (DEFT needs few: 5-50)", min=1, max=1000)
    eta: float = param(0.5, "DDIM stochasticity (posterior diversity; 0 = deterministic)", min=0.0, max=1.0)


_H_CACHE: dict = {}


def _h_network(params: DEFTParams, prior, device):
    key = (params.network, str(device), prior.card.get("weights_sha256"))
    if key not in _H_CACHE:
        if len(_H_CACHE) > 4:
            _H_CACHE.clear()
        _H_CACHE[key] = load_deft(params.network, prior, device=device)
    return _H_CACHE[key]


def run_deft(acq, params: DEFTParams, cancel, device=None):
    check_samples(params)
    if not acq.grid.is_2d and params.orientation != "xy":
        raise ValueError("DEFT's h-network was trained on axial slices: use orientation 'xy' "
                         "(the data term stays fully 3-D)")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    prior = get_prior(params.prior, dev)
    h = _h_network(params, prior, dev)
    if h.image_size != prior.image_size:
        raise ValueError(f"DEFT network {params.network!r} is for {h.image_size}-pixel slices, the prior "
                         f"{prior.name!r} for {prior.image_size}")
    card = h.card.get("deft", {})
    delta, clip = float(card.get("delta", 0.01)), float(card.get("guidance_clip", 10.0))
    trained = float(card.get("scale_threshold", params.scale_threshold))
    if abs(params.scale_threshold - trained) > 1e-9:
        # c sets the units of x0 and g: another support threshold feeds h inputs it never saw
        raise ValueError(f"DEFT network {params.network!r} was trained with scale_threshold {trained:g}; "
                         f"got {params.scale_threshold:g}: leave it at {trained:g}")

    def predict(x_t, state):
        eps0 = state.eps_of(prior, x_t)
        x0 = prior.schedule.tweedie(x_t, eps0, state.t).clamp_min(0)
        g = guidance_image(state.lik, state.scale, x0, delta, clip)
        eps = eps0 + h_volume(h, x_t, x0, g, state.t, generator=state.generator)
        return eps, eps

    def make_dc(lik, c, cancel_token):
        return lambda z, x_t, state: z  # the h-network is the data consistency

    return (yield from run_sampler(acq, params, cancel, device, "deft", make_dc, predict=predict))
