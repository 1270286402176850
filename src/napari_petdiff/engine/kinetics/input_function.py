r"""Plasma input functions: Feng's population model, samples from a file, frame regressors.

Everything is **decay corrected** (activity referred to injection time): Feng's model describes
decay-corrected plasma activity, and the Patlak code decay-corrects the frame images the same way.

An input function is a set of samples ``(t_s, cp)`` interpreted as piecewise linear (zero before
the first sample only if that sample is at t = 0; otherwise the samples must start at 0). Its
cumulative integral is exact for that interpolant. Frame regressors (methods.md 9.1, 13.9):

* ``timing="average"`` (default): ``v_m`` = frame average of C_p and ``u_m`` = frame average of
  ``int_0^t C_p``, both weighted within the frame by the decay ``exp(-lambda t)`` - the weight the
  measured counts carry. Because ``C_T(t) = Ki int_0^t C_p + V C_p(t)`` is linear, the same weighted
  average of the tissue curve obeys it *exactly*: no mid-frame approximation.
* ``timing="mid"``: ``u_m = int_0^{t_mid} C_p`` and ``v_m = C_p(t_mid)`` (the classical choice).

``u`` is in (cp units) x min, so Ki is in 1/min when the images are in cp units.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Feng et al. 1993 FDG plasma input (platform-notes.md 4): t in min, A1 in uCi/mL/min, A2, A3 in uCi/mL.
FENG_PARAMS = {"A1": 851.1225, "A2": 21.8798, "A3": 20.8113, "l1": -4.1339, "l2": -0.0104, "l3": -0.1191,
               "delay_min": 0.5}
FENG_UNITS = "uCi/mL"
TIMINGS = ("average", "mid")
# Finest spacing used to evaluate frame averages (s): the early Feng peak lasts ~15 s.
_QUAD_DT_S = 1.0


class InputFunctionError(ValueError):
    """The input function is missing, malformed or does not cover the frames."""


def feng_cp(t_min, params: dict | None = None) -> np.ndarray:
    """Feng's model ``(A1 s - A2 - A3) e^{l1 s} + A2 e^{l2 s} + A3 e^{l3 s}``, s = t - delay (0 before)."""
    p = dict(FENG_PARAMS, **(params or {}))
    unknown = set(p) - set(FENG_PARAMS)
    if unknown:
        raise InputFunctionError(f"unknown Feng parameter(s) {sorted(unknown)}; known: {sorted(FENG_PARAMS)}")
    s = np.asarray(t_min, dtype=float) - p["delay_min"]
    sp = np.maximum(s, 0.0)
    cp = ((p["A1"] * sp - p["A2"] - p["A3"]) * np.exp(p["l1"] * sp) + p["A2"] * np.exp(p["l2"] * sp)
          + p["A3"] * np.exp(p["l3"] * sp))
    return np.where(s > 0, cp, 0.0)


@dataclass
class InputFunction:
    """Decay-corrected plasma activity samples (piecewise linear between samples)."""
    t_s: np.ndarray
    cp: np.ndarray
    units: str = FENG_UNITS
    source: str = "samples"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        try:
            self.t_s = np.asarray(self.t_s, dtype=float).ravel()
            self.cp = np.asarray(self.cp, dtype=float).ravel()
        except (TypeError, ValueError) as exc:
            raise InputFunctionError(f"input function samples must be numbers: {exc}") from None
        if self.t_s.size != self.cp.size:
            raise InputFunctionError(f"input function has {self.t_s.size} times but {self.cp.size} values; "
                                     "give one value per sample time")
        if self.t_s.size < 2:
            raise InputFunctionError("an input function needs at least two samples")
        if not (np.all(np.isfinite(self.t_s)) and np.all(np.isfinite(self.cp))):
            raise InputFunctionError("input function samples contain NaN or infinite values")
        if np.any(np.diff(self.t_s) <= 0):
            raise InputFunctionError("input function sample times must be strictly increasing (sort them and "
                                     "remove duplicates)")
        if np.any(self.cp < 0):
            raise InputFunctionError(f"input function values must be >= 0 (min {self.cp.min():.3g}); plasma "
                                     "activity cannot be negative")
        if self.t_s[0] < 0:
            raise InputFunctionError("input function sample times must be >= 0 s after injection")
        if self.t_s[0] > 0:
            # The integral from injection needs C_p from t = 0: before the first sample C_p is 0
            # (pre-injection), which is only right if the first sample is early.
            if self.t_s[0] > 60.0:
                raise InputFunctionError(
                    f"the input function starts at {self.t_s[0]:.0f} s; its integral from injection needs samples "
                    "from the first minute (the bolus). Add early samples or use the population model.")
            self.t_s = np.concatenate([[0.0], self.t_s])
            self.cp = np.concatenate([[0.0], self.cp])
        # cumulative integral at the samples (trapezoid = exact for the linear interpolant), cp x s
        self._cum_s = np.concatenate([[0.0], np.cumsum(0.5 * (self.cp[1:] + self.cp[:-1]) * np.diff(self.t_s))])

    # ----------------------------------------------------------------- construction
    @classmethod
    def feng(cls, end_s: float = 3600.0, dt_s: float = 1.0, params: dict | None = None,
             scale: float = 1.0) -> "InputFunction":
        """Feng's population input function sampled every ``dt_s`` seconds up to ``end_s``."""
        if not (end_s > 0 and dt_s > 0):
            raise InputFunctionError("end_s and dt_s must be > 0 seconds")
        if not scale > 0:
            raise InputFunctionError(f"scale must be > 0; got {scale}")
        n = int(np.ceil(end_s / dt_s)) + 1
        t = np.arange(n) * dt_s
        return cls(t, scale * feng_cp(t / 60.0, params), FENG_UNITS, "feng-population",
                   {"model": "Feng 1993", "parameters": dict(FENG_PARAMS, **(params or {})), "scale": scale})

    @classmethod
    def from_dict(cls, d: dict | None) -> "InputFunction":
        if not d:
            raise InputFunctionError("this acquisition has no input function; pass a CSV of plasma samples "
                                     "(input_function=path.csv) or use the population model (input_function="
                                     "'population')")
        try:
            t, cp = d["t_s"], d["cp"]
        except KeyError as exc:
            raise InputFunctionError(f"input function record lacks {exc}; expected keys t_s, cp, units") from None
        return cls(t, cp, d.get("units", "unknown"), d.get("source", "acquisition"), dict(d.get("info", {})))

    def to_dict(self) -> dict:
        return {"t_s": self.t_s.tolist(), "cp": self.cp.tolist(), "units": self.units, "source": self.source,
                "decay_corrected": True, "info": self.info}

    @classmethod
    def from_csv(cls, path, time_unit: str = "auto", units: str = "") -> "InputFunction":
        """Two columns: time and decay-corrected plasma activity; a header line is optional.

        ``time_unit``: "s", "min" or "auto" (from a header containing "min" / "s", else minutes when
        the last time is below 300, seconds otherwise).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"input function file {path} not found")
        if time_unit not in ("auto", "s", "min"):
            raise InputFunctionError(f"time_unit must be 'auto', 's' or 'min'; got {time_unit!r}")
        rows, header = [], None
        with path.open(newline="") as f:
            sample = f.read(4096)
            f.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t ")
            except csv.Error:
                dialect = csv.excel
            for i, row in enumerate(csv.reader(f, dialect)):
                row = [c.strip() for c in row if c.strip()]
                if not row or row[0].startswith("#"):
                    continue
                try:
                    vals = [float(c) for c in row[:2]]
                except ValueError:
                    if header is None and not rows:
                        header = row
                        continue
                    raise InputFunctionError(f"{path}, line {i + 1}: expected two numbers (time, value); "
                                             f"got {row}") from None
                if len(vals) < 2:
                    raise InputFunctionError(f"{path}, line {i + 1}: expected two columns (time, value)")
                rows.append(vals)
        if len(rows) < 2:
            raise InputFunctionError(f"{path} holds fewer than two (time, value) rows")
        a = np.asarray(rows)
        if time_unit == "auto":
            h = (header[0].lower() if header else "")
            if "min" in h:
                time_unit = "min"
            elif h in ("s", "sec", "seconds", "t_s", "time_s", "time [s]", "time (s)") or h.endswith("_s"):
                time_unit = "s"
            else:
                time_unit = "min" if a[-1, 0] < 300 else "s"
        t_s = a[:, 0] * (60.0 if time_unit == "min" else 1.0)
        unit_label = units or (header[1] if header and len(header) > 1 else "unknown")
        return cls(t_s, a[:, 1], unit_label, f"csv:{path.name}", {"time_unit": time_unit})

    # ----------------------------------------------------------------- evaluation
    @property
    def end_s(self) -> float:
        return float(self.t_s[-1])

    def cp_at(self, t_s) -> np.ndarray:
        return np.interp(np.asarray(t_s, float), self.t_s, self.cp, left=0.0, right=np.nan)

    def integral_at(self, t_s) -> np.ndarray:
        """``int_0^t C_p`` in cp units x **seconds** (exact for the piecewise-linear interpolant)."""
        t = np.asarray(t_s, dtype=float)
        k = np.clip(np.searchsorted(self.t_s, t, side="right") - 1, 0, self.t_s.size - 2)
        t0, c0 = self.t_s[k], self.cp[k]
        slope = (self.cp[k + 1] - c0) / (self.t_s[k + 1] - t0)
        d = t - t0
        out = self._cum_s[k] + c0 * d + 0.5 * slope * d * d
        return np.where(t > self.end_s + 1e-9, np.nan, out)

    def check_covers(self, frames) -> None:
        last = float(np.max(frames.stop_s))
        if self.end_s < last - 1e-6:
            raise InputFunctionError(
                f"the input function ends at {self.end_s:.0f} s ({self.end_s / 60:.1f} min) but the frames run to "
                f"{last:.0f} s ({last / 60:.1f} min): it must cover every frame used. Supply samples up to the end "
                "of the scan (or fit fewer frames).")

    def regressors(self, frames, index=None, timing: str = "average"):
        """Patlak regressors for frames ``index`` (all by default): (u [cp x min], v [cp])."""
        if timing not in TIMINGS:
            raise InputFunctionError(f"timing must be one of {TIMINGS}; got {timing!r}")
        idx = np.arange(frames.n_frames) if index is None else np.asarray(index, dtype=int)
        sub = _SubFrames(frames.start_s[idx], frames.stop_s[idx])
        self.check_covers(sub)
        if timing == "mid":
            mid = 0.5 * (sub.start_s + sub.stop_s)
            return self.integral_at(mid) / 60.0, self.cp_at(mid)
        lam = decay_constant(frames.decay_half_life_s)
        u = np.empty(len(idx))
        v = np.empty(len(idx))
        for m, (a, b) in enumerate(zip(sub.start_s, sub.stop_s)):
            t = frame_quadrature_times(self.t_s, a, b)
            w = np.exp(-lam * (t - a))  # the constant exp(-lam a) cancels in the ratio
            u[m] = weighted_average(t, self.integral_at(t), w) / 60.0
            v[m] = weighted_average(t, self.cp_at(t), w)
        return u, v


@dataclass
class _SubFrames:
    start_s: np.ndarray
    stop_s: np.ndarray


def decay_constant(half_life_s) -> float:
    """lambda in 1/s (0 when the data are not to be decay corrected)."""
    return 0.0 if not half_life_s else float(np.log(2.0) / float(half_life_s))


def decay_integral_s(frames, index=None) -> np.ndarray:
    """``int_frame exp(-lambda t) dt`` in seconds: what one unit of decay-corrected activity
    contributes to a frame's counts (the frame duration when there is no decay)."""
    idx = np.arange(frames.n_frames) if index is None else np.asarray(index, dtype=int)
    a, b = frames.start_s[idx], frames.stop_s[idx]
    lam = decay_constant(frames.decay_half_life_s)
    if lam == 0.0:
        return b - a
    return (np.exp(-lam * a) - np.exp(-lam * b)) / lam


def frame_quadrature_times(knots: np.ndarray, a: float, b: float) -> np.ndarray:
    """The knots inside (a, b), the ends, and points at most ``_QUAD_DT_S`` apart."""
    n = max(int(np.ceil((b - a) / _QUAD_DT_S)) + 1, 3)
    inside = knots[(knots > a) & (knots < b)]
    return np.unique(np.concatenate([np.linspace(a, b, n), inside]))


def weighted_average(t: np.ndarray, f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Trapezoid ``int f w / int w`` over the last axis of f (f may carry leading axes)."""
    dt = np.diff(t)
    fw = f * w
    num = 0.5 * ((fw[..., 1:] + fw[..., :-1]) * dt).sum(axis=-1)
    den = 0.5 * ((w[1:] + w[:-1]) * dt).sum()
    return num / den


def resolve_input_function(acq, spec: str = "file", time_unit: str = "auto") -> InputFunction:
    """``spec``: "file" (the acquisition's samples), "population" (Feng) or a CSV path."""
    if spec in ("", "file", "acquisition"):
        return InputFunction.from_dict(acq.input_function)
    if spec in ("population", "feng"):
        end = float(np.max(acq.frames.stop_s)) if acq.frames is not None else 3600.0
        return InputFunction.feng(end_s=end)
    return InputFunction.from_csv(spec, time_unit)
