r"""Two-tissue compartment model (FDG) per tissue class, with blood volume.

``dC1/dt = K1 Cp - (k2 + k3) C1 + k4 C2``, ``dC2/dt = k3 C1 - k4 C2``, ``C_T = C1 + C2`` and the
voxel signal ``C_PET = (1 - vB) C_T + vB Cp`` (whole blood taken equal to plasma). The impulse
response is a sum of two exponentials (Huang 1980); the convolution with a piecewise-linear
input is evaluated exactly by a recursion over the input samples, so a uniform 1 s input grid
gives the tissue curve to rounding error.

Units: K1 in mL/min/mL, k2..k4 in 1/min, vB dimensionless. The irreversible uptake rate that
Patlak estimates is ``Ki = (1 - vB) K1 k3 / (k2 + k3)`` (exact when k4 = 0; with k4 > 0 a
Patlak fit underestimates it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class TissueKinetics:
    K1: float
    k2: float
    k3: float
    k4: float = 0.0
    vb: float = 0.05

    def __post_init__(self):
        for name in ("K1", "k2", "k3", "k4", "vb"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"rate constant {name} must be a finite number >= 0; got {v}")
        if self.vb >= 1:
            raise ValueError(f"blood volume fraction vb must be < 1; got {self.vb}")

    @property
    def ki(self) -> float:
        """Net influx rate (1/min) of the voxel signal, blood fraction included."""
        s = self.k2 + self.k3
        return 0.0 if s == 0 else (1.0 - self.vb) * self.K1 * self.k3 / s

    def irreversible(self) -> "TissueKinetics":
        return replace(self, k4=0.0)

    def to_dict(self) -> dict:
        return asdict(self)

    def impulse_response(self):
        """(amplitudes (mL/min/mL), rates (1/min)) with ``h(t) = sum_i a_i exp(-b_i t)``."""
        K1, k2, k3, k4 = self.K1, self.k2, self.k3, self.k4
        s = k2 + k3 + k4
        disc = np.sqrt(max(s * s - 4.0 * k2 * k4, 0.0))
        b1, b2 = 0.5 * (s - disc), 0.5 * (s + disc)
        if K1 == 0:
            return np.zeros(2), np.array([b1, b2])
        if b2 - b1 < 1e-12:  # k3 = k4 = 0: one tissue compartment
            return np.array([K1, 0.0]), np.array([k2, k2])
        a1 = K1 * (k3 + k4 - b1) / (b2 - b1)
        a2 = K1 * (b2 - k3 - k4) / (b2 - b1)
        return np.array([a1, a2]), np.array([b1, b2])


# Huang et al. 1980 (platform-notes.md 4). CSF: negligible uptake; lesions: hot = raised K1 and k3
# (hypermetabolic), cold = WM with low k3.
KINETIC_SETS: dict[str, dict[str, TissueKinetics]] = {
    "huang1980": {
        "gm": TissueKinetics(0.102, 0.130, 0.062, 0.0068, 0.05),
        "wm": TissueKinetics(0.054, 0.109, 0.045, 0.0058, 0.03),
        "csf": TissueKinetics(0.0, 0.0, 0.0, 0.0, 0.0),
        "hot_lesion": TissueKinetics(0.150, 0.130, 0.120, 0.0068, 0.05),
        "cold_lesion": TissueKinetics(0.040, 0.109, 0.015, 0.0058, 0.03),
    },
}


def kinetic_set(name: str = "huang1980", k4_zero: bool = True) -> dict[str, TissueKinetics]:
    if name not in KINETIC_SETS:
        raise ValueError(f"unknown kinetic parameter set {name!r}; choose one of {sorted(KINETIC_SETS)}")
    out = dict(KINETIC_SETS[name])
    return {k: v.irreversible() for k, v in out.items()} if k4_zero else out


def exp_convolve(t_s: np.ndarray, cp: np.ndarray, rate_per_min: float) -> np.ndarray:
    """``int_0^t cp(s) exp(-b (t - s)) ds`` (cp x min) at the samples, cp piecewise linear."""
    t_min = np.asarray(t_s, float) / 60.0
    cp = np.asarray(cp, float)
    out = np.zeros_like(cp)
    b = float(rate_per_min)
    dt = np.diff(t_min)
    if b * max(float(dt.max()), 0.0) < 1e-8:
        # b ~ 0: plain cumulative trapezoid
        out[1:] = np.cumsum(0.5 * (cp[1:] + cp[:-1]) * dt)
        return out
    E = np.exp(-b * dt)
    i0 = (1.0 - E) / b                                  # int_0^dt e^{-b(dt - r)} dr
    i1 = dt * i0 - (1.0 - E * (1.0 + b * dt)) / b ** 2  # int_0^dt r e^{-b(dt - r)} dr
    slope = np.diff(cp) / dt
    inc = cp[:-1] * i0 + slope * i1
    acc = 0.0
    for k in range(dt.size):
        acc = E[k] * acc + inc[k]
        out[k + 1] = acc
    return out


def tissue_curve(t_s: np.ndarray, cp: np.ndarray, kin: TissueKinetics) -> np.ndarray:
    """C_T(t) (without the blood term) at the samples."""
    amps, rates = kin.impulse_response()
    out = np.zeros(np.asarray(cp).shape, float)
    for a, b in zip(amps, rates):
        if a != 0:
            out += a * exp_convolve(t_s, cp, b)
    return out


def pet_curve(t_s: np.ndarray, cp: np.ndarray, kin: TissueKinetics) -> np.ndarray:
    """Voxel signal ``(1 - vB) C_T + vB Cp`` at the samples (decay corrected)."""
    return (1.0 - kin.vb) * tissue_curve(t_s, cp, kin) + kin.vb * np.asarray(cp, float)
