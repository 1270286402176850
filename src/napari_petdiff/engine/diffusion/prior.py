"""ScorePrior: a trained epsilon network + its schedule + what it was trained on.

Images handed to a prior are *normalised* (divided by the mean over the emission support, as in
training, methods.md 2.3); samplers keep the physical scale ``c`` themselves.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from .lora import LoRA
from .schedule import DDPMSchedule
from .unet import UNet

# slice axis and the two in-plane axes (of z, y, x) for each orientation
_ORIENT = {"xy": (0, (1, 2)), "xz": (1, (0, 2)), "yz": (2, (0, 1))}


class ScorePrior:
    def __init__(self, net: UNet, schedule: DDPMSchedule | None = None, name: str = "prior",
                 image_size: int = 128, voxel_size_mm: float = 2.0, normalisation: dict | None = None,
                 card: dict | None = None, bf16: bool = False):
        self.net = net.eval()
        self.schedule = schedule or DDPMSchedule()
        self.name = name
        self.image_size = int(image_size)
        self.voxel_size_mm = float(voxel_size_mm)
        self.normalisation = normalisation or {
            "method": "support-mean",
            "description": "each training slice divided by its mean over voxels > 0, then x U(0.5, 1.5)",
        }
        self.card = card or {}
        self.bf16 = bool(bf16)
        self._lora: Optional[LoRA] = None

    # --- basics -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def cond_channels(self) -> int:
        return self.net.cond_channels

    def to(self, device) -> "ScorePrior":
        self.net.to(device)
        return self

    def __repr__(self) -> str:
        return (f"ScorePrior({self.name!r}, {self.image_size}x{self.image_size} @ {self.voxel_size_mm} mm, "
                f"{sum(p.numel() for p in self.net.parameters())} params, {self.schedule})")

    def _autocast(self, x: torch.Tensor):
        if self.bf16:
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _target_size(self, n: int) -> int:
        m = self.net.multiple
        return max(self.image_size, -(-n // m) * m)

    # --- 2-D network calls ------------------------------------------------------------------------
    def _net_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        with self._autocast(x):
            out = self.net(x, t, cond)
        return out.to(x.dtype)

    def eps(self, x_t: torch.Tensor, t, cond: torch.Tensor | None = None, guidance: float = 0.0,
            grad: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Predicted noise for (B, 1, H, W) normalised images at timestep(s) ``t``.

        Images smaller than the training size (or not a multiple of the UNet's) are padded with
        schedule-consistent noise (the clean background is zero) and cropped back.
        ``guidance`` w > 0 mixes conditional and unconditional predictions (classifier-free):
        (1 + w) eps(cond) - w eps(no cond). ``grad=True`` keeps the autograd graph (DPS, LoRA fitting).
        """
        if x_t.dim() != 4 or x_t.shape[1] != 1:
            raise ValueError(f"ScorePrior.eps expects (B, 1, H, W) images; got shape {tuple(x_t.shape)}. "
                             "Use eps_volume for (z, y, x) volumes.")
        b, _, h, w = x_t.shape
        t = torch.as_tensor(t, dtype=torch.long, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have one entry per image ({b}); got shape {tuple(t.shape)}")
        if cond is not None and cond.shape[-2:] != (h, w):
            raise ValueError(f"cond must match the images' size {h}x{w}; got {tuple(cond.shape)}")
        H, W = self._target_size(h), self._target_size(w)
        oh, ow = (H - h) // 2, (W - w) // 2
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if (H, W) != (h, w):
                ab = self.schedule.abar(t, x_t)
                noise = torch.randn((b, 1, H, W), device=x_t.device, dtype=x_t.dtype, generator=generator)
                big = (1 - ab).sqrt() * noise
                x_in = big.clone()
                x_in[:, :, oh:oh + h, ow:ow + w] = x_t
                if cond is not None:
                    c_in = torch.zeros((b, cond.shape[1], H, W), device=x_t.device, dtype=x_t.dtype)
                    c_in[:, :, oh:oh + h, ow:ow + w] = cond
                    cond = c_in
            else:
                x_in = x_t
            out = self._net_eps(x_in, t, cond)
            if guidance and cond is not None:
                out_u = self._net_eps(x_in, t, torch.zeros_like(cond))
                out = (1 + guidance) * out - guidance * out_u
            return out[:, :, oh:oh + h, ow:ow + w]

    def tweedie(self, x_t: torch.Tensor, t, cond: torch.Tensor | None = None, guidance: float = 0.0,
                grad: bool = False) -> torch.Tensor:
        eps = self.eps(x_t, t, cond, guidance=guidance, grad=grad)
        return self.schedule.tweedie(x_t, eps, t)

    # --- volumes ----------------------------------------------------------------------------------
    def eps_volume(self, x_t: torch.Tensor, t, orientation: str = "xy", chunk: int = 16,
                   cond: torch.Tensor | None = None, guidance: float = 0.0, grad: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Epsilon for a (nz, ny, nx) or (S, nz, ny, nx) volume, slice by slice along ``orientation``.

        "xy" = axial slices (y, x), "xz" = coronal (z, x), "yz" = sagittal (z, y). ``t`` is a scalar
        or one timestep per volume (S,). Slices are batched ``chunk`` at a time to bound memory.
        """
        if orientation not in _ORIENT:
            raise ValueError(f"orientation must be one of {sorted(_ORIENT)}; got {orientation!r}")
        if x_t.dim() not in (3, 4):
            raise ValueError(f"eps_volume expects (nz, ny, nx) or (S, nz, ny, nx); got {tuple(x_t.shape)}")
        single = x_t.dim() == 3
        v = x_t[None] if single else x_t
        cv = None if cond is None else (cond[None] if cond.dim() == 3 else cond)
        if cv is not None and cv.shape != v.shape:
            raise ValueError(f"cond volume must have the shape of x_t {tuple(v.shape)}; got {tuple(cond.shape)}")
        S = v.shape[0]
        tt = torch.as_tensor(t, dtype=torch.long, device=x_t.device).reshape(-1)
        if tt.numel() == 1:
            tt = tt.expand(S)
        if tt.numel() != S:
            raise ValueError(f"t must be a scalar or have one entry per volume ({S}); got {tt.numel()}")
        ax, (a1, a2) = _ORIENT[orientation]
        perm = (0, ax + 1, a1 + 1, a2 + 1)
        sl = v.permute(perm)  # (S, n_slices, h, w)
        n = sl.shape[1]
        flat = sl.reshape(S * n, 1, sl.shape[2], sl.shape[3])
        tflat = tt.repeat_interleave(n)
        cflat = None if cv is None else cv.permute(perm).reshape(S * n, 1, sl.shape[2], sl.shape[3])
        outs = []
        chunk = max(1, int(chunk))
        for i in range(0, flat.shape[0], chunk):
            c = None if cflat is None else cflat[i:i + chunk]
            outs.append(self.eps(flat[i:i + chunk], tflat[i:i + chunk], c, guidance, grad, generator))
        out = torch.cat(outs).reshape(sl.shape).permute(tuple(np.argsort(perm)))
        return out[0] if single else out

    def tweedie_volume(self, x_t: torch.Tensor, t, orientation: str = "xy", chunk: int = 16, **kw) -> torch.Tensor:
        eps = self.eps_volume(x_t, t, orientation, chunk, **kw)
        return self.schedule.tweedie(x_t, eps, t)

    # --- compatibility with an acquisition ---------------------------------------------------------
    def check_grid(self, grid, orientations=("xy",), rtol: float = 0.05) -> None:
        """Raise ValueError unless slices of ``grid`` (engine.grid.ImageGrid) fit this prior."""
        problems = []
        for o in orientations:
            if o not in _ORIENT:
                raise ValueError(f"orientation must be one of {sorted(_ORIENT)}; got {o!r}")
            _, (a1, a2) = _ORIENT[o]
            if o != "xy" and grid.shape[0] == 1:
                continue  # a 2-D image has no coronal/sagittal slices
            size = (grid.shape[a1], grid.shape[a2])
            vox = (grid.voxel_size[a1], grid.voxel_size[a2])
            if max(size) > self.image_size:
                problems.append(f"{o} slices are {size[0]}x{size[1]} voxels, larger than the prior's "
                                f"{self.image_size}x{self.image_size}")
            if any(abs(vv - self.voxel_size_mm) > rtol * self.voxel_size_mm for vv in vox):
                problems.append(f"{o} voxel size is {vox[0]:g} x {vox[1]:g} mm but the prior was trained at "
                                f"{self.voxel_size_mm:g} mm")
        pers = (getattr(self, "card", None) or {}).get("personalised")
        if pers and "target_grid" in pers:
            from ..grid import ImageGrid

            target = ImageGrid.from_dict(pers["target_grid"])
            if not target.contains(grid):
                raise ValueError(
                    f"prior {self.name!r} was personalised for the subject whose MR is on grid {target.describe()}; "
                    f"this image grid ({grid.describe()}) is not part of it, so it is probably another subject or "
                    "space. Reconstruct on the MR's grid (or a slice of it), or personalise a prior for this "
                    "acquisition's MR (petdiff personalise --acq ...).")
        if problems:
            raise ValueError(
                f"image grid {grid.describe()} does not fit prior {self.name!r} "
                f"({self.image_size}x{self.image_size} slices at {self.voxel_size_mm:g} mm): " + "; ".join(problems)
                + f". Fix: resample the reconstruction grid to {self.voxel_size_mm:g} mm voxels with at most "
                  f"{self.image_size} voxels in-plane (e.g. ImageGrid((nz, {self.image_size}, {self.image_size}), "
                  f"({self.voxel_size_mm:g}, {self.voxel_size_mm:g}, {self.voxel_size_mm:g}))), or pick/train "
                  "another prior (`petdiff priors`, `petdiff train --image-size ... --voxel-size ...`)."
            )

    # --- LoRA ---------------------------------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None, targets=None) -> LoRA:
        if self._lora is not None and self._lora.active:
            raise ValueError("this prior already has LoRA adapters: call remove_lora() first")
        self._lora = LoRA(self.net, rank, alpha, targets)
        return self._lora

    def remove_lora(self) -> None:
        if self._lora is not None:
            self._lora.reset()
            self._lora = None

    @contextlib.contextmanager
    def lora(self, rank: int = 4, alpha: float | None = None, targets=None):
        """``with prior.lora(4) as ad: opt = Adam(ad.parameters()) ...`` - removed on exit."""
        ad = self.add_lora(rank, alpha, targets)
        try:
            yield ad
        finally:
            self.remove_lora()
