r"""PET-LiSch (Webber et al., IEEE TMI 2025): likelihood-scheduled data consistency.

The MLEM log-likelihood curve ``l_k`` of this acquisition is computed once (cached). Step n of
N targets ``l*(kappa_n)``, linearly interpolated at the fractional MLEM iteration
``kappa_n = K_start + (K_end - K_start) f(n/N)`` (f linear, sqrt or log). At each step the
Tweedie image is moved along EM directions with an exact 1-D line search (two sinograms per
direction) until its likelihood reaches the target, at most ``max_updates`` directions; a
target out of reach raises a warning: the prior's sample disagrees with the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..classical import mlem_iterates
from ..params import param
from .core import SamplingParams, run_sampler

SCHEDULES = ("linear", "sqrt", "log")


@dataclass
class LiSchParams(SamplingParams):
    target_iteration: float = param(20.0, "likelihood target: the MLEM iteration whose likelihood the final "
                                    "sample must reach (larger = closer to the data, noisier)", min=0.0, max=2000.0)
    start_iteration: float = param(0.0, "MLEM iteration targeted at the first (noisiest) step", min=0.0,
                                   max=2000.0, advanced=True)
    schedule: str = param("linear", "map from step to MLEM iteration", choices=SCHEDULES)
    max_updates: int = param(10, "cap on EM directions per step", min=1, max=200, advanced=True)
    alpha_max: float = param(2.0, "largest step along an EM direction (> 1 clamps at 0)", min=0.1, max=20.0,
                             advanced=True)


def _frac(n: int, N: int, kind: str) -> float:
    r = n / N
    if kind == "linear":
        return r
    if kind == "sqrt":
        return math.sqrt(r)
    return math.log1p(r * (math.e - 1))  # log map: 0 -> 0, 1 -> 1, steep early


def mlem_curve(acq, n_iter: int, cancel=None, device=None) -> list[float]:
    """Log-likelihood of MLEM iterates 0..n_iter; cached on the acquisition object."""
    from ..likelihood import PoissonLikelihood

    cache = acq.__dict__.setdefault("_mlem_curve_cache", {})
    key = str(device)
    have = cache.get(key)
    if have is not None and len(have) > n_iter:
        return have[: n_iter + 1]
    lik = PoissonLikelihood(acq, 1, device=device)
    vals = [float(lik.value(x)) for _, x in mlem_iterates(lik, n_iter, cancel)]
    cache[key] = vals
    return vals


def target_at(curve: list[float], kappa: float) -> float:
    if kappa < 0 or kappa > len(curve) - 1:
        raise ValueError(f"MLEM iteration {kappa} is outside the computed curve (0..{len(curve) - 1})")
    k0 = int(math.floor(kappa))
    k1 = min(k0 + 1, len(curve) - 1)
    return curve[k0] + (kappa - k0) * (curve[k1] - curve[k0])


def lisch_targets(curve, N: int, k_start: float, k_end: float, schedule: str) -> list[float]:
    return [target_at(curve, k_start + (k_end - k_start) * _frac(n, N, schedule)) for n in range(1, N + 1)]


def lisch_setup(acq, params: LiSchParams, cancel, device):
    """(MLEM curve, per-step likelihood targets, make_dc) shared by LiSch and its adapted variant."""
    if params.start_iteration > params.target_iteration:
        raise ValueError("start_iteration must not exceed target_iteration")
    k_end = int(math.ceil(params.target_iteration))
    curve = mlem_curve(acq, k_end, cancel, device)
    targets = lisch_targets(curve, params.steps, params.start_iteration, params.target_iteration, params.schedule)

    def make_dc(lik, c, cancel_token):
        def dc(z, x_t, state):
            target = targets[state.step]
            u = z
            b_shape = (-1,) + (1,) * (u.ndim - 1)
            for _ in range(params.max_updates):
                cancel_token.raise_if_cancelled()
                # One forward + one back give L(u) and the EM direction; one more forward gives A d.
                em, val, q0 = lik.em_step_and_value(u)
                need = val < target
                if not bool(need.any()):
                    break
                d = torch.where(need.view(b_shape), em - u, torch.zeros_like(u))
                qd = lik.forward(d)
                alpha, _, _ = lik.line_search_to_target(u, d, target, params.alpha_max, q0=q0, qd=qd)
                u = lik.mask((u + alpha.view(b_shape).to(u.dtype) * d).clamp_min(0))
            reached = lik.value(u) >= target - 1e-6 * abs(target)
            if not bool(reached.all()) and state.step >= state.n_steps - 3:
                state.warn(f"PET-LiSch could not reach the likelihood target (MLEM iteration "
                           f"{params.target_iteration}) within {params.max_updates} updates: the prior's sample "
                           "disagrees with the data (out-of-distribution?); raise max_updates or lower the target")
            return u

        return dc

    return curve, targets, make_dc


def attach_targets(result, curve, targets):
    result.metadata["likelihood_targets"] = targets
    result.metadata["mlem_curve"] = curve
    result.metadata["final_target"] = targets[-1]
    return result


def run_lisch(acq, params: LiSchParams, cancel, device=None):
    curve, targets, make_dc = lisch_setup(acq, params, cancel, device)
    result = yield from run_sampler(acq, params, cancel, device, "lisch", make_dc)
    return attach_targets(result, curve, targets)
