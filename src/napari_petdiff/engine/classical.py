"""Classical reconstruction under the run protocol: MLEM, OSEM, MAP with RDP (BSREM)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .likelihood import PoissonLikelihood
from .params import param, params_to_dict
from .rdp import RDP
from .run import CancelToken, Intermediate, MethodGen, Progress, Result


@dataclass
class MLEMParams:
    iterations: int = param(50, "number of MLEM iterations", min=1, max=10000)


@dataclass
class OSEMParams:
    iterations: int = param(4, "number of full passes over the data", min=1, max=1000)
    subsets: int = param(8, "number of view subsets (ordered Herman-Meyer)", min=1, max=512)


@dataclass
class MAPRDPParams:
    beta: float = param(1.0, "RDP weight (scales with counts; sweep it)", min=0.0)
    gamma: float = param(2.0, "RDP edge preservation (2 is the common default)", min=0.0, max=100.0)
    epochs: int = param(30, "BSREM passes over the data", min=1, max=10000)
    subsets: int = param(8, "view subsets per pass", min=1, max=512)
    relaxation: float = param(0.1, "step size a0 / (1 + relaxation * epoch)", min=0.0, max=10.0, advanced=True)
    axial_only: bool = param(False, "RDP-z: only the two axial neighbours (couples slice-wise images)",
                             advanced=True)


def _trace(lik: PoissonLikelihood, x) -> float:
    return float(lik.value(x))


def mlem_iterates(lik: PoissonLikelihood, n_iter: int, cancel: CancelToken | None = None, x0=None):
    """Yield (k, x_k) for k = 0..n_iter (x_0 uniform): shared by MLEM and the LiSch schedule."""
    x = lik.uniform_image() if x0 is None else x0
    yield 0, x
    for k in range(1, n_iter + 1):
        if cancel is not None:
            cancel.raise_if_cancelled()
        x = lik.em_step(x)
        yield k, x


def run_mlem(acq, params: MLEMParams, cancel: CancelToken, device=None) -> MethodGen:
    lik = PoissonLikelihood(acq, 1, device=device)
    trace = []
    x = None
    for k, x in mlem_iterates(lik, params.iterations, cancel):
        trace.append(_trace(lik, x))
        if k:
            yield Progress(k, params.iterations, f"MLEM iteration {k}/{params.iterations}", "mlem")
            yield Intermediate(x, k, "MLEM")
    return Result(mean=x, likelihood=trace, metadata={"method": "mlem", "params": params_to_dict(params)})


def osem_epochs(lik: PoissonLikelihood, epochs: int, cancel: CancelToken | None, x0=None):
    x = lik.uniform_image() if x0 is None else x0
    for e in range(1, epochs + 1):
        for m in lik.subset_order:
            if cancel is not None:
                cancel.raise_if_cancelled()
            x = lik.em_step(x, m)
        yield e, x


def run_osem(acq, params: OSEMParams, cancel: CancelToken, device=None) -> MethodGen:
    lik = PoissonLikelihood(acq, params.subsets, device=device)
    x = lik.uniform_image()
    trace = [_trace(lik, x)]
    for e, x in osem_epochs(lik, params.iterations, cancel, x):
        trace.append(_trace(lik, x))
        yield Progress(e, params.iterations, f"OSEM iteration {e}/{params.iterations}", "osem")
        yield Intermediate(x, e, "OSEM")
    return Result(mean=x, likelihood=trace, metadata={"method": "osem", "params": params_to_dict(params)})


def run_map_rdp(acq, params: MAPRDPParams, cancel: CancelToken, device=None) -> MethodGen:
    """BSREM: x <- [x + a (x + eps)/s (M grad L_m - beta grad R)]_+, relaxed a, OSEM start."""
    lik = PoissonLikelihood(acq, params.subsets, device=device)
    rdp = RDP(acq.grid.voxel_size, params.gamma, is_2d=acq.grid.is_2d, axial_only=params.axial_only)
    x = lik.uniform_image()
    for _, x in osem_epochs(lik, 1, cancel, x):
        pass
    eps = float(x.max()) * 1e-3
    s = lik.sensitivity.clamp_min(1e-12)
    M = lik.n_subsets
    trace, objective = [_trace(lik, x)], [0.0]
    objective[0] = trace[0] - params.beta * float(rdp.value(x))
    for e in range(params.epochs):
        a = 1.0 / (1.0 + params.relaxation * e)
        for m in lik.subset_order:
            cancel.raise_if_cancelled()
            g = M * lik.gradient(x, m) - params.beta * rdp.gradient(x)
            x = lik.mask((x + a * (x + eps) / s * g).clamp_min(0))
        trace.append(_trace(lik, x))
        objective.append(trace[-1] - params.beta * float(rdp.value(x)))
        yield Progress(e + 1, params.epochs, f"BSREM epoch {e + 1}/{params.epochs}", "map-rdp")
        yield Intermediate(x, e + 1, "MAP-RDP")
    return Result(mean=x, likelihood=trace,
                  metadata={"method": "map-rdp", "params": params_to_dict(params),
                            "objective": objective})
