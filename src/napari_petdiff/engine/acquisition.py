"""Acquisition: measured prompts plus everything needed to model them.

``ybar = mult * P(PSF(x)) + additive`` (per frame for dynamic data). Multiplicative
factors (attenuation x normalisation) stay inside the model and are never divided out of
the prompts: pre-corrected data are no longer Poisson.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .grid import ImageGrid


class AcquisitionError(ValueError):
    """The acquisition's arrays or geometry are inconsistent."""


def _as_tensor(a, name) -> torch.Tensor:
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a user error here
            raise AcquisitionError(f"{name} could not be read as a numeric array: {exc}") from None
    if not (t.is_floating_point() or t.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16)):
        raise AcquisitionError(f"{name} must be numeric; got dtype {t.dtype}")
    return t.to(torch.float32)


def _check_values(t: torch.Tensor, name: str, positive: bool = False) -> None:
    if not torch.isfinite(t).all():
        n = int((~torch.isfinite(t)).sum())
        raise AcquisitionError(f"{name} contains {n} NaN or infinite value(s); fix or mask them before reconstruction.")
    if positive:
        if (t <= 0).any():
            raise AcquisitionError(
                f"{name} must be > 0 in every bin (got min {float(t.min()):.3g}); a zero factor means a bin that "
                "cannot detect anything: remove it from the geometry or set a small positive value.")
    elif (t < 0).any():
        raise AcquisitionError(
            f"{name} has negative values (min {float(t.min()):.3g}); PET counts and backgrounds are >= 0. "
            "Were randoms subtracted? Pass raw prompts and give randoms as the additive background instead.")


def _checked_mr(mr, grid: ImageGrid) -> Optional[torch.Tensor]:
    t = _as_tensor(mr, "MR image")
    if t is None:
        return None
    if tuple(t.shape) != tuple(grid.shape):
        raise AcquisitionError(
            f"the MR image has shape {tuple(t.shape)} but the PET reconstruction grid has {grid.describe()}; "
            "resample the MR to the PET reconstruction grid (same shape, voxel size and origin) before "
            "attaching it.")
    if not torch.isfinite(t).all():
        n = int((~torch.isfinite(t)).sum())
        raise AcquisitionError(f"the MR image contains {n} NaN or infinite value(s); replace them (e.g. by 0 "
                               "outside the head) before attaching it.")
    return t


@dataclass
class FrameTiming:
    """Frame start/stop times in seconds after injection."""
    start_s: np.ndarray
    stop_s: np.ndarray
    decay_half_life_s: Optional[float] = 6586.2  # F-18

    def __post_init__(self):
        self.start_s = np.asarray(self.start_s, dtype=float).ravel()
        self.stop_s = np.asarray(self.stop_s, dtype=float).ravel()
        if self.start_s.shape != self.stop_s.shape or self.start_s.size == 0:
            raise AcquisitionError(
                f"frame timing needs as many start as stop times (got {self.start_s.size} and {self.stop_s.size}).")
        if not (np.all(np.isfinite(self.start_s)) and np.all(np.isfinite(self.stop_s))):
            raise AcquisitionError("frame times must be finite numbers of seconds")
        if np.any(self.start_s < 0):
            raise AcquisitionError("frame start times must be >= 0 s after injection")
        if np.any(self.stop_s <= self.start_s):
            k = int(np.argmax(self.stop_s <= self.start_s))
            raise AcquisitionError(f"frame {k} stops ({self.stop_s[k]} s) before it starts ({self.start_s[k]} s)")
        if np.any(np.diff(self.start_s) <= 0):
            raise AcquisitionError("frames must be sorted by start time (found an unsorted or repeated start)")
        if np.any(self.start_s[1:] < self.stop_s[:-1] - 1e-6):
            k = int(np.argmax(self.start_s[1:] < self.stop_s[:-1] - 1e-6))
            raise AcquisitionError(f"frames {k} and {k + 1} overlap ({self.stop_s[k]} s > {self.start_s[k + 1]} s)")

    @property
    def n_frames(self) -> int:
        return int(self.start_s.size)

    @property
    def durations_s(self) -> np.ndarray:
        return self.stop_s - self.start_s

    @property
    def mid_s(self) -> np.ndarray:
        return 0.5 * (self.start_s + self.stop_s)

    def to_dict(self) -> dict:
        return {"start_s": self.start_s.tolist(), "stop_s": self.stop_s.tolist(),
                "decay_half_life_s": self.decay_half_life_s}

    @classmethod
    def from_dict(cls, d: dict) -> "FrameTiming":
        return cls(d["start_s"], d["stop_s"], d.get("decay_half_life_s"))


@dataclass
class ListmodeEvents:
    """List-mode prompts: one LOR per event, endpoints in mm, (z, y, x) order."""
    xstart: torch.Tensor
    xend: torch.Tensor
    multiplicative: Optional[torch.Tensor] = None
    additive: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.xstart = _as_tensor(self.xstart, "list-mode xstart").to(torch.float64)
        self.xend = _as_tensor(self.xend, "list-mode xend").to(torch.float64)
        if self.xstart.ndim != 2 or self.xstart.shape[1] != 3 or self.xstart.shape != self.xend.shape:
            raise AcquisitionError(
                f"list-mode endpoints must both have shape (n_events, 3); got {tuple(self.xstart.shape)} "
                f"and {tuple(self.xend.shape)}")
        n = self.xstart.shape[0]
        for name in ("multiplicative", "additive"):
            v = _as_tensor(getattr(self, name), f"list-mode {name}")
            if v is not None:
                if v.shape != (n,):
                    raise AcquisitionError(f"list-mode {name} must have shape ({n},); got {tuple(v.shape)}")
                _check_values(v, f"list-mode {name}", positive=(name == "multiplicative"))
            setattr(self, name, v)

    @property
    def n_events(self) -> int:
        return int(self.xstart.shape[0])


@dataclass
class Acquisition:
    """A static or dynamic PET acquisition.

    prompts: counts, shape ``geometry.sinogram_shape`` (static) or ``(n_frames, *sinogram_shape)``
    (dynamic, with ``frames``). ``multiplicative``: attenuation x normalisation per bin (one
    sinogram, shared by frames; frame duration and decay are folded in by the caller if wanted).
    ``additive``: expected randoms + scatter in measured counts (sinogram, or one per frame).
    ``sensitivity_multiplicative`` is used by list-mode data to form the sensitivity image.
    ``mr``: optional anatomical MR (T1-like, ~[0, 1]) already resampled to ``grid``, shape
    ``grid.shape``, read by MR-conditioned methods; ``with_mr`` attaches or replaces it.
    """
    prompts: Optional[torch.Tensor]
    geometry: object
    grid: ImageGrid
    multiplicative: Optional[torch.Tensor] = None
    additive: Optional[torch.Tensor] = None
    psf_fwhm_mm: tuple = (0.0, 0.0, 0.0)
    frames: Optional[FrameTiming] = None
    listmode: Optional[ListmodeEvents] = None
    input_function: Optional[dict] = None  # {"t_s": [...], "cp": [...], "units": "..."} for dynamic data
    metadata: dict = field(default_factory=dict)
    mr: Optional[torch.Tensor] = None

    def __post_init__(self):
        if not isinstance(self.grid, ImageGrid):
            raise AcquisitionError("grid must be an ImageGrid (shape, voxel size, origin)")
        if not hasattr(self.geometry, "sinogram_shape"):
            raise AcquisitionError("geometry must be a napari_petdiff.engine.geometry.Geometry")
        self.geometry.check_grid(self.grid)
        sino = tuple(self.geometry.sinogram_shape)
        psf = self.psf_fwhm_mm
        psf = (float(psf),) * 3 if np.isscalar(psf) else tuple(float(p) for p in psf)
        if len(psf) != 3 or min(psf) < 0:
            raise AcquisitionError(f"psf_fwhm_mm must be one or three non-negative mm values; got {self.psf_fwhm_mm}")
        self.psf_fwhm_mm = psf
        self.prompts = _as_tensor(self.prompts, "prompts")
        if self.prompts is None and self.listmode is None:
            raise AcquisitionError("an acquisition needs prompts (a sinogram) or list-mode events")
        if self.prompts is not None and self.listmode is not None:
            raise AcquisitionError("give either a prompts sinogram or list-mode events, not both")
        if self.prompts is not None:
            want = sino if self.frames is None else (self.frames.n_frames, *sino)
            if tuple(self.prompts.shape) != want:
                if self.frames is not None and tuple(self.prompts.shape[1:]) == sino:
                    raise AcquisitionError(
                        f"the prompts have {self.prompts.shape[0]} frames but the frame timing lists "
                        f"{self.frames.n_frames}; give one start/stop pair per frame.")
                raise AcquisitionError(
                    f"prompts have shape {tuple(self.prompts.shape)} but the geometry "
                    f"({self.geometry.describe()}) expects {want} (planes, views, radial bins"
                    f"{'' if self.frames is None else ', after the frame axis'}).")
            _check_values(self.prompts, "prompts")
            if self.prompts.sum() <= 0:
                raise AcquisitionError("the prompts are all zero: nothing to reconstruct")
        self.multiplicative = _as_tensor(self.multiplicative, "multiplicative factors")
        if self.multiplicative is not None:
            if tuple(self.multiplicative.shape) != sino:
                raise AcquisitionError(
                    f"multiplicative factors have shape {tuple(self.multiplicative.shape)}; expected the sinogram "
                    f"shape {sino}")
            _check_values(self.multiplicative, "multiplicative factors", positive=True)
        self.additive = _as_tensor(self.additive, "additive background")
        if self.additive is not None:
            ok = [sino] if self.frames is None else [sino, (self.frames.n_frames, *sino)]
            if tuple(self.additive.shape) not in ok:
                raise AcquisitionError(
                    f"additive background has shape {tuple(self.additive.shape)}; expected one of {ok}")
            _check_values(self.additive, "additive background")
        self.mr = _checked_mr(self.mr, self.grid)

    # ------------------------------------------------------------------ helpers
    @property
    def is_dynamic(self) -> bool:
        return self.frames is not None

    @property
    def is_listmode(self) -> bool:
        return self.listmode is not None

    @property
    def total_counts(self) -> float:
        if self.listmode is not None:
            return float(self.listmode.n_events)
        return float(self.prompts.sum())

    def frame(self, k: int) -> "Acquisition":
        """Frame ``k`` of a dynamic acquisition as a static acquisition."""
        if self.frames is None:
            raise AcquisitionError("this acquisition is static; it has no frames")
        if not 0 <= k < self.frames.n_frames:
            raise AcquisitionError(f"frame {k} does not exist (0..{self.frames.n_frames - 1})")
        add = self.additive
        if add is not None and add.ndim == len(self.geometry.sinogram_shape) + 1:
            add = add[k]
        meta = dict(self.metadata, frame=k, frame_start_s=float(self.frames.start_s[k]),
                    frame_stop_s=float(self.frames.stop_s[k]))
        return Acquisition(self.prompts[k], self.geometry, self.grid, self.multiplicative, add,
                           self.psf_fwhm_mm, None, None, None, meta, mr=self.mr)

    def with_mr(self, mr) -> "Acquisition":
        """The same acquisition (arrays shared, not copied) with ``mr`` attached; ``None`` removes it."""
        out = copy.copy(self)  # the other fields were validated already
        out.mr = _checked_mr(mr, self.grid)
        out.metadata = dict(self.metadata)  # so later edits of one do not show in the other
        return out

    def describe(self) -> str:
        kind = "list-mode" if self.is_listmode else ("dynamic" if self.is_dynamic else "static")
        lines = [f"{kind} PET acquisition", f"  geometry: {self.geometry.describe()}",
                 f"  image grid: {self.grid.describe()}", f"  total prompts: {self.total_counts:.4g}"]
        if self.frames is not None:
            lines.append(f"  frames: {self.frames.n_frames} from {self.frames.start_s[0]:.0f} s to "
                         f"{self.frames.stop_s[-1]:.0f} s")
        if self.additive is not None and self.prompts is not None:
            lines.append(f"  background fraction: {float(self.additive.sum() / self.prompts.sum()):.3f}")
        lines.append(f"  PSF FWHM (z, y, x) mm: {self.psf_fwhm_mm}")
        if self.mr is None:
            lines.append("  MR image: none")
        else:
            lines.append(f"  MR image: attached, values {float(self.mr.min()):.3g} to {float(self.mr.max()):.3g}")
        return "\n".join(lines)
