"""Poisson model for several frames of a dynamic acquisition at once (batched over frames).

Frames share the geometry, attenuation/normalisation and PSF, so the system matrix and the
sensitivity image are built once; prompts and backgrounds carry a leading frame axis and every
projection processes all frames in one call. Mirrors ``engine.likelihood.PoissonLikelihood``
(same EM update, same FOV rule, same log-likelihood without the ``log y!`` constant).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..acquisition import Acquisition
from ..likelihood import herman_meyer_order
from ..run import CancelToken
from ..system import system_for

_TINY = 1e-12


class FrameModel:
    def __init__(self, acq: Acquisition, frame_index, n_subsets: int = 1, device=None,
                 fov_threshold: float = 1e-3):
        if not acq.is_dynamic:
            raise ValueError("FrameModel needs a dynamic acquisition (prompts with a frame axis and frame timing)")
        if acq.is_listmode:
            raise ValueError("dynamic list-mode data are not supported: bin the events into frame sinograms first")
        idx = np.asarray(frame_index, dtype=int).ravel()
        if idx.size == 0:
            raise ValueError("no frames selected")
        if idx.min() < 0 or idx.max() >= acq.frames.n_frames:
            raise ValueError(f"frame index out of range 0..{acq.frames.n_frames - 1}: {idx.tolist()}")
        n_views = acq.geometry.n_views
        if not isinstance(n_subsets, int) or not 1 <= n_subsets <= n_views:
            raise ValueError(f"subsets must be an integer in 1..{n_views} (views); got {n_subsets!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.index = idx
        self.grid = acq.grid
        self.image_shape = tuple(acq.grid.shape)
        self.n_frames = int(idx.size)
        self.n_subsets = n_subsets
        self.subset_order = herman_meyer_order(n_subsets)
        sino = tuple(acq.geometry.sinogram_shape)
        ti = torch.as_tensor(idx, device=acq.prompts.device)
        y = acq.prompts.index_select(0, ti).to(self.device)
        if acq.additive is None:
            b = torch.zeros_like(y)
        elif acq.additive.ndim == len(sino) + 1:
            b = acq.additive.index_select(0, ti).to(self.device)
        else:
            b = acq.additive.to(self.device).expand_as(y).clone()
        # A static view of the scan gives the shared system model (frame data are ours).
        static = Acquisition(y.sum(0), acq.geometry, acq.grid, acq.multiplicative, None, acq.psf_fwhm_mm)
        full = system_for(static, None, "auto", self.device)
        sens = full.back(torch.ones(full.out_shape, device=self.device))
        self.fov = sens > fov_threshold * sens.max()
        self.sensitivity = torch.where(self.fov, sens, torch.zeros_like(sens))
        self._full = (full, y, b, self.sensitivity)
        self._parts = [self._full]
        if n_subsets > 1:
            self._parts = []
            for views in acq.geometry.view_subsets(n_subsets):
                views = views.to(self.device)
                sm = system_for(static, views, "auto", self.device)
                s_m = sm.back(torch.ones(sm.out_shape, device=self.device))
                self._parts.append((sm, y.index_select(-2, views), b.index_select(-2, views),
                                    torch.where(self.fov, s_m, torch.zeros_like(s_m))))
        self.y, self.b = y, b

    def _part(self, subset: Optional[int]):
        return self._full if subset is None else self._parts[subset]

    def check(self, x: torch.Tensor) -> None:
        if tuple(x.shape) != (self.n_frames, *self.image_shape):
            raise ValueError(f"frame images have shape {tuple(x.shape)}; expected ({self.n_frames}, "
                             f"{', '.join(map(str, self.image_shape))}) (frames, z, y, x)")

    def em_step(self, x: torch.Tensor, subset: Optional[int] = None) -> torch.Tensor:
        """One MLEM (or OSEM sub-iteration) update of every frame; zero outside the FOV."""
        self.check(x)
        sys_, y, b, s = self._part(subset)
        q = sys_.forward(x) + b
        back = sys_.back(y / q.clamp_min(_TINY))
        return torch.where(self.fov, x / s.clamp_min(_TINY) * back, torch.zeros_like(x))

    def subset_sensitivity(self, subset: Optional[int] = None) -> torch.Tensor:
        return self._part(subset)[3]

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame Poisson log-likelihood (float64, shape (n_frames,))."""
        self.check(x)
        sys_, y, b, _ = self._full
        q = (sys_.forward(x) + b).clamp_min(_TINY).double()
        yd = y.double()
        dims = tuple(range(1, q.ndim))
        return (torch.where(yd > 0, yd * q.log(), torch.zeros_like(q)) - q).sum(dim=dims)

    def uniform_image(self) -> torch.Tensor:
        """Per frame: net counts / total sensitivity inside the FOV."""
        net = (self.y - self.b).flatten(1).sum(1).clamp_min(1.0)
        net = torch.maximum(net, 0.05 * self.y.flatten(1).sum(1)).clamp_min(1.0)
        level = net / self.sensitivity.sum()
        img = torch.where(self.fov, torch.ones(self.image_shape, device=self.device),
                          torch.zeros(self.image_shape, device=self.device))
        return level.view(-1, *([1] * len(self.image_shape))).to(img.dtype) * img

    def osem(self, epochs: int, cancel: Optional[CancelToken] = None, x0: Optional[torch.Tensor] = None):
        """Yield (epoch, images) after each pass over the subsets."""
        x = self.uniform_image() if x0 is None else x0
        for e in range(1, int(epochs) + 1):
            for m in self.subset_order:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                x = self.em_step(x, m if self.n_subsets > 1 else None)
            yield e, x
