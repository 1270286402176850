r"""Dynamic FDG simulation: input function -> tissue curves -> per-frame Poisson sinograms.

Pipeline (docs/patlak.md):

1. Feng's decay-corrected plasma input, sampled every second.
2. One curve per tissue class (GM, WM, CSF, hot / cold lesion) from the two-tissue compartment
   model (``model="2tcm"``; ``k4_zero=True`` makes uptake irreversible so Patlak's Ki is the truth)
   or, for exact tests, straight from the Patlak equation (``model="patlak"``).
3. Voxel curves = tissue-fraction-weighted sums of the class curves (partial volume is linear).
4. Frame m's image is ``int_frame C_PET(t) exp(-lambda t) dt``: decayed activity x duration, so a
   frame's counts are proportional to activity x duration x decay. One calibration ``kappa``
   (counts per unit of decay-corrected activity x second, stored as ``activity_calibration``)
   makes the expected trues over all simulated frames equal ``counts``.
5. Every frame goes through ``engine.simulate.simulate`` with the same geometry, attenuation and
   PSF (randoms + scatter = ``background_fraction`` of that frame's trues), one Poisson seed per frame.

The prompts are NOT decay corrected (they are counts); the frame images a reconstruction gives
are therefore decayed activity x duration, and the Patlak code divides them by
``kappa int_frame exp(-lambda t) dt`` to get decay-corrected activity in input-function units.
Ground truth (what Patlak estimates, methods.md 13.9: the fit to noise-free data): ``ki`` (1/min)
and ``intercept`` = fraction-weighted Patlak fits of the noise-free class curves over the frames
starting at or after ``t_star_min``. ``ki_analytic`` = ``(1 - vB) K1 k3 / (k2 + k3)``: with k4 = 0
the two differ by ~1 % in GM (Feng's 0.12/min input component is not yet equilibrated at 30 min),
with k4 > 0 the fit is ~16-18 % lower; with ``model="patlak"`` they are equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..acquisition import Acquisition, FrameTiming
from ..simulate import simulate
from ..system import system_for
from .compartment import TissueKinetics, kinetic_set, pet_curve
from .input_function import InputFunction, decay_integral_s, frame_quadrature_times, weighted_average

# 35 frames over 60 min (platform-notes.md 4): (number of frames, duration in s)
DEFAULT_SCHEDULE = ((12, 10.0), (6, 30.0), (5, 60.0), (4, 150.0), (8, 300.0))
F18_HALF_LIFE_S = 6586.2
MODELS = ("2tcm", "patlak")


def frame_schedule(schedule=DEFAULT_SCHEDULE, start_min: float = 0.0,
                   half_life_s: Optional[float] = F18_HALF_LIFE_S) -> FrameTiming:
    """Contiguous frames from injection; keep those starting at or after ``start_min``."""
    try:
        blocks = [(int(n), float(d)) for n, d in schedule]
    except (TypeError, ValueError):
        raise ValueError(f"schedule must be (count, duration_s) pairs, e.g. {DEFAULT_SCHEDULE}; got {schedule!r}") \
            from None
    if not blocks or any(n < 1 or d <= 0 for n, d in blocks):
        raise ValueError(f"schedule needs positive frame counts and durations; got {schedule!r}")
    durs = np.concatenate([np.full(n, d) for n, d in blocks])
    stops = np.cumsum(durs)
    starts = stops - durs
    keep = starts >= float(start_min) * 60.0 - 1e-6
    if not keep.any():
        raise ValueError(f"no frame starts at or after {start_min} min (the schedule ends at {stops[-1] / 60:.1f} min)")
    return FrameTiming(starts[keep], stops[keep], half_life_s)


@dataclass
class DynamicSimulation:
    acquisition: Acquisition
    ki: torch.Tensor             # (z, y, x) 1/min
    intercept: torch.Tensor      # (z, y, x) dimensionless
    frame_activity: torch.Tensor  # (n_frames, z, y, x) decay-corrected frame-average activity, cp units
    calibration: float           # kappa: reconstruction units per (cp unit x s)
    input_function: InputFunction
    classes: dict = field(default_factory=dict)  # per class: kinetics, ki, intercept, analytic ki
    ki_analytic: Optional[torch.Tensor] = None   # (1 - vB) K1 k3 / (k2 + k3), fraction weighted


def _class_frame_averages(inp: InputFunction, frames: FrameTiming, kin: TissueKinetics, model: str,
                          ki: float, intercept: float) -> np.ndarray:
    lam = np.log(2.0) / frames.decay_half_life_s if frames.decay_half_life_s else 0.0
    curve = pet_curve(inp.t_s, inp.cp, kin) if model == "2tcm" else None
    out = np.empty(frames.n_frames)
    for m, (a, b) in enumerate(zip(frames.start_s, frames.stop_s)):
        t = frame_quadrature_times(inp.t_s, a, b)
        if model == "2tcm":
            f = np.interp(t, inp.t_s, curve)
        else:
            f = ki * inp.integral_at(t) / 60.0 + intercept * inp.cp_at(t)
        out[m] = weighted_average(t, f, np.exp(-lam * (t - a)))
    return out


def _ls_fit(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    P = np.stack([u, v], axis=1)
    sol, *_ = np.linalg.lstsq(P, y, rcond=None)
    return float(sol[0]), float(sol[1])


def simulate_dynamic(fractions: dict, grid, geometry, mu=None, *, kinetics: dict, frames: FrameTiming | None = None,
                     input_function: InputFunction | None = None, counts: float = 1e6,
                     background_fraction: float = 0.3, psf_fwhm_mm=0.0, model: str = "2tcm",
                     t_star_min: float = 30.0, seed: int = 0, noise: bool = True, device=None,
                     metadata: dict | None = None) -> DynamicSimulation:
    """Simulate a dynamic scan from tissue-fraction maps ``{class: (z, y, x) array}``.

    ``kinetics`` maps every class in ``fractions`` to a :class:`TissueKinetics`. ``counts``: total
    expected trues summed over the simulated frames.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}; got {model!r}")
    missing = sorted(set(fractions) - set(kinetics))
    if missing:
        raise ValueError(f"no kinetic parameters for tissue class(es) {missing}; give a TissueKinetics for each")
    if not counts or counts <= 0:
        raise ValueError(f"counts (total expected trues over all frames) must be > 0; got {counts}")
    frames = frame_schedule() if frames is None else frames
    inp = InputFunction.feng(end_s=float(frames.stop_s[-1])) if input_function is None else input_function
    inp.check_covers(frames)
    late = np.flatnonzero(frames.start_s >= t_star_min * 60.0 - 1e-6)
    if late.size < 2:
        raise ValueError(f"the truth intercept needs >= 2 frames starting after t* = {t_star_min} min; only "
                         f"{late.size} do. Lower t_star_min or add frames.")
    u, v = inp.regressors(frames, late, "average")
    fr = {k: np.asarray(a, dtype=np.float64) for k, a in fractions.items()}
    for k, a in fr.items():
        if a.shape != tuple(grid.shape):
            raise ValueError(f"fraction map {k!r} has shape {a.shape} but the grid is {grid.shape}")
        if not np.all(np.isfinite(a)) or (a < 0).any():
            raise ValueError(f"fraction map {k!r} must be finite and >= 0")

    classes, curves = {}, {}
    for k in fr:
        kin = kinetics[k]
        avg2 = _class_frame_averages(inp, frames, kin, "2tcm", 0.0, 0.0)
        ki_fit, icpt = _ls_fit(avg2[late], u, v)
        curves[k] = avg2 if model == "2tcm" else _class_frame_averages(inp, frames, kin, "patlak", kin.ki, icpt)
        if model == "patlak":
            ki_fit, icpt = _ls_fit(curves[k][late], u, v)
        classes[k] = {"kinetics": kin.to_dict(), "ki": ki_fit, "intercept": icpt, "ki_analytic": kin.ki}

    shape = tuple(grid.shape)
    ki_map = sum(fr[k] * classes[k]["ki"] for k in fr)
    ki_analytic = sum(fr[k] * classes[k]["ki_analytic"] for k in fr)
    icpt_map = sum(fr[k] * classes[k]["intercept"] for k in fr)
    act = np.zeros((frames.n_frames, *shape))
    for k in fr:
        act += curves[k][:, None, None, None] * fr[k][None]
    act = np.maximum(act, 0.0)
    dint = decay_integral_s(frames)
    counts_img = act * dint[:, None, None, None]          # cp units x s (decayed)

    dev = torch.device(device) if device is not None else torch.device("cpu")
    total = counts_img.sum(axis=0).astype(np.float32)
    if total.sum() <= 0:
        raise ValueError("the simulated activity is zero in every frame: check the fraction maps and kinetics")
    sim0 = simulate(total, grid, geometry, mu, counts=counts, background_fraction=0.0, psf_fwhm_mm=psf_fwhm_mm,
                    noise=False, device=dev)
    kappa = sim0.scale
    system = system_for(sim0.acquisition, None, "auto", dev)
    sino = tuple(geometry.sinogram_shape)
    prompts = torch.zeros((frames.n_frames, *sino), device=dev)
    additive = torch.zeros((frames.n_frames, *sino), device=dev)
    for m in range(frames.n_frames):
        img = counts_img[m].astype(np.float32)
        if img.sum() <= 0:
            continue  # before the bolus arrives: nothing detected (randoms here scale with the trues)
        trues_m = float(system.forward(torch.as_tensor(img, device=dev)).sum()) * kappa
        seed_m = int(np.random.SeedSequence([int(seed), m]).generate_state(1)[0])
        sim = simulate(img, grid, geometry, mu, counts=trues_m, background_fraction=background_fraction,
                       psf_fwhm_mm=psf_fwhm_mm, seed=seed_m, noise=noise, device=dev)
        prompts[m] = sim.acquisition.prompts
        if sim.acquisition.additive is not None:
            additive[m] = sim.acquisition.additive
    meta = dict(metadata or {})
    meta.update({
        "simulated": True, "dynamic": True, "counts_trues": float(counts), "background_fraction": background_fraction,
        "seed": seed, "noise": noise, "kinetic_model": model, "t_star_min_truth": float(t_star_min),
        "activity_calibration": float(kappa),
        "activity_calibration_units": f"reconstruction units per ({inp.units} x s), decay corrected",
        "decay_corrected_prompts": False, "classes": classes,
    })
    acq = Acquisition(prompts, geometry, grid, sim0.acquisition.multiplicative,
                      additive if background_fraction > 0 else None, sim0.acquisition.psf_fwhm_mm, frames, None,
                      inp.to_dict(), meta)
    f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    return DynamicSimulation(acq, f32(ki_map), f32(icpt_map), f32(act), float(kappa), inp, classes,
                             f32(ki_analytic))


def phantom_fractions(ph) -> dict:
    """Tissue classes of a brain Phantom; lesion voxels become pure hot / cold lesion tissue."""
    fr = {"gm": np.array(ph.gm, dtype=np.float64), "wm": np.array(ph.wm, dtype=np.float64),
          "csf": np.array(ph.csf, dtype=np.float64)}
    infos = ph.info.get("lesions", []) if isinstance(ph.info, dict) else []
    for i, m in enumerate(getattr(ph, "lesion_masks", []) or []):
        contrast = infos[i]["contrast"] if i < len(infos) else 1.5
        name = "hot_lesion" if contrast >= 1.0 else "cold_lesion"
        m = np.asarray(m, dtype=bool)
        for k in fr:
            fr[k][m] = 0.0
        fr.setdefault(name, np.zeros_like(fr["gm"]))[m] = 1.0
    return fr


def make_dynamic_scan(phantom: str = "brain2d", counts: float = 1e6, background_fraction: float = 0.3,
                      seed: int = 0, *, lesions: bool = True, kinetic_set_name: str = "huang1980",
                      k4_zero: bool = True, model: str = "2tcm", schedule=DEFAULT_SCHEDULE, start_min: float = 0.0,
                      psf_fwhm_mm: float = 0.0, t_star_min: float = 30.0, noise: bool = True,
                      deformation_seed=None, device=None):
    """A dynamic FDG brain scan: returns (Acquisition with frames and input function, images).

    ``images``: ``ki`` (1/min), ``intercept``, ``ki_analytic``, ``brain_mask``, ``mu`` and ``lesion{i}`` masks.
    ``start_min`` > 0 keeps only the later frames (Patlak needs those after t*); ``counts`` is the
    total expected trues over the frames kept.
    """
    if phantom not in ("brain2d", "brain3d"):
        raise ValueError(f"dynamic scans need a phantom with tissue classes: 'brain2d' or 'brain3d' (got {phantom!r})")
    from ..samples import geometry_for, make_phantom

    ph = make_phantom(phantom, "fdg", lesions, deformation_seed)
    fr = phantom_fractions(ph)
    kin = kinetic_set(kinetic_set_name, k4_zero)
    frames = frame_schedule(schedule, start_min)
    sim = simulate_dynamic(fr, ph.grid, geometry_for(ph.grid), ph.mu, kinetics=kin, frames=frames, counts=counts,
                           background_fraction=background_fraction, psf_fwhm_mm=psf_fwhm_mm, model=model,
                           t_star_min=t_star_min, seed=seed, noise=noise, device=device,
                           metadata={"phantom": phantom, "tracer": "fdg", "lesions": lesions,
                                     "kinetic_set": kinetic_set_name, "k4_zero": k4_zero})
    images = {"ki": sim.ki, "intercept": sim.intercept, "ki_analytic": sim.ki_analytic,
              "brain_mask": torch.as_tensor(np.asarray(ph.brain_mask, np.float32)),
              "mu": torch.as_tensor(np.asarray(ph.mu, np.float32))}
    for i, m in enumerate(ph.lesion_masks or []):
        images[f"lesion{i}"] = torch.as_tensor(np.asarray(m, np.float32))
    return sim.acquisition.with_mr(ph.mr), images
