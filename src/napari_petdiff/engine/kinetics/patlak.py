r"""Patlak graphical analysis: frame selection, regressors, voxel-wise (W)LS, Patlak plot.

After t*, ``C_m = Ki u_m + V v_m`` per voxel (methods.md 9.1), ``u`` = integral of C_p (cp x min),
``v`` = C_p (frame averaged, see input_function.py). ``C_m`` is the frame image converted to
decay-corrected activity: reconstructed frame images are counts (decayed activity x duration,
never decay corrected), so ``C_m = x_m / (kappa int_frame exp(-lambda t) dt)`` with the activity
calibration ``kappa`` (reconstruction units per cp unit x s; simulations store it in the
acquisition's metadata). Ki is then in 1/min, V dimensionless.

The indirect methods reconstruct every frame after t* with OSEM (all frames in one batch), and
``patlak-ls`` / ``patlak-wls`` fit each voxel in closed form: ``theta = (P^T W P)^-1 P^T W C``
(one 2 x M matrix for the whole image, as W is per frame).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..operators import GaussianPSF
from ..params import param, params_to_dict
from ..run import CancelToken, Intermediate, MethodGen, Progress, Result, RunWarning
from .frames import FrameModel
from .input_function import TIMINGS, InputFunction, decay_integral_s, resolve_input_function

WEIGHTINGS = ("uniform", "counts")


@dataclass
class PatlakSetup:
    index: np.ndarray          # frames used (indices into the acquisition's frames)
    start_s: np.ndarray
    stop_s: np.ndarray
    u: np.ndarray              # cp x min
    v: np.ndarray              # cp
    decay_int_s: np.ndarray    # int_frame exp(-lambda t) dt, s
    calibration: float
    weights: np.ndarray        # per frame, mean 1
    t_star_min: float
    timing: str
    input_function: InputFunction
    calibrated: bool

    @property
    def n_frames(self) -> int:
        return int(self.index.size)

    @property
    def design(self) -> np.ndarray:
        return np.stack([self.u, self.v], axis=1)

    def to_concentration(self, x: torch.Tensor) -> torch.Tensor:
        """Frame images (M, *img) in reconstruction units -> decay-corrected activity (cp units)."""
        f = torch.as_tensor(1.0 / (self.calibration * self.decay_int_s), dtype=x.dtype, device=x.device)
        return x * f.view(-1, *([1] * (x.ndim - 1)))

    def to_counts(self, c: torch.Tensor) -> torch.Tensor:
        f = torch.as_tensor(self.calibration * self.decay_int_s, dtype=c.dtype, device=c.device)
        return c * f.view(-1, *([1] * (c.ndim - 1)))

    def units(self) -> dict:
        cp = self.input_function.units
        if self.calibrated:
            return {"ki": "1/min (mL/min/mL)", "intercept": "dimensionless (mL/mL)", "input_function": cp}
        return {"ki": f"image units per ({cp} x min) (no activity calibration)",
                "intercept": f"image units per {cp}", "input_function": cp}

    def metadata(self) -> dict:
        return {"t_star_min": self.t_star_min, "frames_used": self.index.tolist(),
                "frame_start_s": self.start_s.tolist(), "frame_stop_s": self.stop_s.tolist(),
                "timing": self.timing, "activity_calibration": self.calibration, "units": self.units(),
                "weights": self.weights.tolist(), "input_function_source": self.input_function.source,
                "decay_corrected": True}


def patlak_setup(acq, t_star_min: float = 30.0, timing: str = "average", input_function="file",
                 time_unit: str = "auto", calibration: float = 0.0, weighting: str = "counts",
                 warn=None) -> PatlakSetup:
    """Check the timing and build the Patlak regressors for frames starting at or after t*."""
    if not getattr(acq, "is_dynamic", False):
        raise ValueError("Patlak analysis needs a dynamic acquisition (frames with start/stop times); this one "
                         "is static. Simulate one with `petdiff simulate --dynamic`.")
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}; got {timing!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    fr = acq.frames
    if acq.prompts is not None and acq.prompts.shape[0] != fr.n_frames:
        raise ValueError(f"the data have {acq.prompts.shape[0]} frames but the timing lists {fr.n_frames}")
    t_star_s = float(t_star_min) * 60.0
    last_start = float(fr.start_s[-1])
    if t_star_s > last_start + 1e-6:
        raise ValueError(f"t* = {t_star_min} min is after the start of the last frame ({last_start / 60:.2f} min): "
                         "no frame is left to fit. Choose a t* before the last frames (typically 20-30 min).")
    idx = np.flatnonzero(fr.start_s >= t_star_s - 1e-6)
    if idx.size < 2:
        raise ValueError(f"only {idx.size} frame starts at or after t* = {t_star_min} min; a Patlak fit needs at "
                         f"least 2 (frames start at {np.round(fr.start_s / 60, 2).tolist()} min). Lower t*.")
    inp = input_function if isinstance(input_function, InputFunction) else \
        resolve_input_function(acq, input_function, time_unit)
    u, v = inp.regressors(fr, idx, timing)
    if np.any(v <= 0):
        raise ValueError("the input function is zero during a frame after t*: check its time unit (s vs min)")
    P = np.stack([u, v], axis=1)
    if np.linalg.cond(P / np.linalg.norm(P, axis=0)) > 1e6:
        raise ValueError("the Patlak regressors are (nearly) collinear over these frames; use more, longer or "
                         "later frames")
    calibrated = True
    if calibration and calibration > 0:
        kappa = float(calibration)
    elif "activity_calibration" in (acq.metadata or {}):
        kappa = float(acq.metadata["activity_calibration"])
    else:
        kappa, calibrated = 1.0, False
        if warn is not None:
            warn("no activity calibration given (parameter 'calibration' or the file's 'activity_calibration'): "
                 "Ki and the intercept are in relative units")
    dint = decay_integral_s(fr, idx)
    if weighting == "uniform":
        w = np.ones(idx.size)
    else:
        # var(C_m) ~ frame counts / (kappa D_m)^2: weight = inverse variance proxy
        sel = torch.as_tensor(idx, device=acq.prompts.device)
        counts = acq.prompts.index_select(0, sel).flatten(1).sum(1).double().cpu().numpy()
        w = dint ** 2 / np.maximum(counts, 1.0)
    w = w / w.mean()
    return PatlakSetup(idx, fr.start_s[idx].copy(), fr.stop_s[idx].copy(), u, v, dint, kappa, w,
                       float(t_star_min), timing, inp, calibrated)


def fit_matrix(setup: PatlakSetup, weights=None) -> np.ndarray:
    """(2, M) matrix G with theta = G C for every voxel."""
    P = setup.design
    w = np.ones(setup.n_frames) if weights is None else np.asarray(weights, float)
    PtW = P.T * w
    return np.linalg.solve(PtW @ P, PtW)


def fit_patlak(conc: torch.Tensor, setup: PatlakSetup, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel-wise (weighted) least squares: conc (M, *img) -> (Ki, V) images."""
    if conc.shape[0] != setup.n_frames:
        raise ValueError(f"got {conc.shape[0]} frame images but the Patlak setup uses {setup.n_frames} frames "
                         f"({setup.index.tolist()}); pass one image per frame after t*")
    G = torch.as_tensor(fit_matrix(setup, weights), dtype=conc.dtype, device=conc.device)
    theta = torch.einsum("km,m...->k...", G, conc)
    return theta[0], theta[1]


def patlak_plot(tac, setup: PatlakSetup) -> dict:
    """Patlak plot of one curve (M,): x = int C_p / C_p (min), y = C_T / C_p, with the regression line."""
    y_t = np.asarray(tac.detach().cpu().numpy() if isinstance(tac, torch.Tensor) else tac, dtype=float).ravel()
    if y_t.size != setup.n_frames:
        raise ValueError(f"the curve has {y_t.size} values but {setup.n_frames} frames are used")
    x = setup.u / setup.v
    y = y_t / setup.v
    slope, icpt = np.polyfit(x, y, 1)
    return {"x_min": x, "y": y, "slope": float(slope), "intercept": float(icpt)}


def region_curve(conc: torch.Tensor, mask) -> np.ndarray:
    """Mean of each frame over a boolean mask (z, y, x)."""
    m = torch.as_tensor(np.asarray(mask, dtype=bool), device=conc.device)
    if tuple(m.shape) != tuple(conc.shape[1:]):
        raise ValueError(f"mask shape {tuple(m.shape)} does not match the images {tuple(conc.shape[1:])}")
    if not m.any():
        raise ValueError("the region mask is empty")
    return conc[:, m].mean(dim=1).double().cpu().numpy()


# ---------------------------------------------------------------------- run protocol
@dataclass
class PatlakModelParams:
    """The Patlak model's settings, shared by the indirect (frames first) and the direct methods."""
    t_star: float = param(30.0, "Patlak start time t*: frames starting at or after it are fitted", min=0.0,
                          max=10000.0, unit="min")
    input_function: str = param("file", "plasma input: 'file' (stored with the scan), 'population' (Feng) or "
                                "the path of a CSV (time, value)")
    time_unit: str = param("auto", "time unit of a CSV input function", choices=("auto", "s", "min"), advanced=True)
    timing: str = param("average", "regressors: frame averages (exact) or mid-frame values", choices=TIMINGS,
                        advanced=True)
    calibration: float = param(0.0, "activity calibration: reconstruction units per (input unit x s); 0 = from "
                               "the file", min=0.0, advanced=True)


@dataclass
class PatlakParams(PatlakModelParams):
    iterations: int = param(3, "OSEM iterations per frame", min=1, max=200)
    subsets: int = param(10, "OSEM view subsets", min=1, max=512)
    postfilter_fwhm: float = param(0.0, "Gaussian post-filter of the frame images (0 = none)", min=0.0, max=50.0,
                                   unit="mm", advanced=True)


@dataclass
class PatlakLSParams(PatlakParams):
    pass


@dataclass
class PatlakWLSParams(PatlakParams):
    pass


def postfilter(x: torch.Tensor, grid, fwhm_mm: float) -> torch.Tensor:
    if fwhm_mm <= 0:
        return x
    f = (0.0 if grid.is_2d else fwhm_mm, fwhm_mm, fwhm_mm)
    return GaussianPSF(grid, f).apply(x)


def reconstruct_frames(acq, setup: PatlakSetup, params: PatlakParams, cancel: CancelToken, device=None,
                       step0: int = 0, total: int | None = None):
    """OSEM of the frames after t* (batched); returns decay-corrected activity images (M, *img)."""
    model = FrameModel(acq, setup.index, params.subsets, device=device)
    total = params.iterations if total is None else total
    x = None
    for e, x in model.osem(params.iterations, cancel):
        yield Progress(step0 + e, total, f"OSEM of {setup.n_frames} frames: iteration {e}/{params.iterations}",
                       "frames")
    x = postfilter(x, acq.grid, params.postfilter_fwhm)
    return setup.to_concentration(x), model


def _setup_from(acq, params, weighting, warnings: list):
    return patlak_setup(acq, params.t_star, params.timing, params.input_function, params.time_unit,
                        params.calibration, weighting, warn=warnings.append)


def _run_fit(acq, params: PatlakParams, cancel: CancelToken, device, weighted: bool, name: str) -> MethodGen:
    warnings: list = []
    setup = _setup_from(acq, params, "counts" if weighted else "uniform", warnings)
    for w in warnings:
        yield RunWarning(w)
    conc, model = yield from reconstruct_frames(acq, setup, params, cancel, device, total=params.iterations + 1)
    ki, V = fit_patlak(conc, setup, setup.weights if weighted else None)
    fov = model.fov
    ki, V = torch.where(fov, ki, torch.zeros_like(ki)), torch.where(fov, V, torch.zeros_like(V))
    yield Progress(params.iterations + 1, params.iterations + 1, "Patlak fit", "fit")
    yield Intermediate(ki, params.iterations + 1, "Ki")
    meta = {"method": name, "params": params_to_dict(params), **setup.metadata()}
    return Result(mean=ki, extra={"intercept": V}, metadata=meta, warnings=warnings)


def run_patlak_ls(acq, params: PatlakLSParams, cancel: CancelToken, device=None) -> MethodGen:
    return (yield from _run_fit(acq, params, cancel, device, False, "patlak-ls"))


def run_patlak_wls(acq, params: PatlakWLSParams, cancel: CancelToken, device=None) -> MethodGen:
    return (yield from _run_fit(acq, params, cancel, device, True, "patlak-wls"))
