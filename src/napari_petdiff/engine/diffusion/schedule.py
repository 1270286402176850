"""Discrete DDPM schedule (linear betas) with the Tweedie estimate and the DDIM update.

Conventions follow methods.md 13.2: ``alpha_bar[t] = prod_{s<=t}(1 - beta_s)`` for t in 0..T-1,
and ``t = -1`` stands for the clean image (alpha_bar = 1), the target of the last DDIM step.
The classic DDIM eta convention is used (eta = 0 deterministic, eta = 1 DDPM-like).
"""
from __future__ import annotations

import torch


class DDPMSchedule:
    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if int(T) < 2:
            raise ValueError(f"DDPMSchedule needs T >= 2 steps; got T={T}.")
        if not (0 < beta_start <= beta_end < 1):
            raise ValueError(
                f"DDPMSchedule needs 0 < beta_start <= beta_end < 1; got {beta_start}, {beta_end}."
            )
        self.T = int(T)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        # float64 so that 1 - alpha_bar near t = 0 keeps its precision.
        self.betas = torch.linspace(beta_start, beta_end, self.T, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)

    def to_dict(self) -> dict:
        return {"type": "ddpm-linear", "T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: dict) -> "DDPMSchedule":
        if d.get("type", "ddpm-linear") != "ddpm-linear":
            raise ValueError(f"unknown schedule type {d.get('type')!r}; this version knows 'ddpm-linear'.")
        return cls(int(d["T"]), float(d["beta_start"]), float(d["beta_end"]))

    # --- alpha_bar lookup, broadcast to x ----------------------------------------------------------
    def _check_t(self, t: torch.Tensor, allow_clean: bool = False) -> torch.Tensor:
        lo = -1 if allow_clean else 0
        if t.numel() and (int(t.min()) < lo or int(t.max()) > self.T - 1):
            raise ValueError(f"timestep out of range [{lo}, {self.T - 1}]: got {t.tolist()}")
        return t

    def abar(self, t, like: torch.Tensor, allow_clean: bool = False) -> torch.Tensor:
        """alpha_bar_t as a tensor of ``like``'s dtype/device, shaped to broadcast over (B, ...)."""
        tt = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        self._check_t(tt, allow_clean)
        ab = torch.where(tt < 0, torch.ones((), dtype=torch.float64), self.alpha_bar[tt.clamp_min(0)])
        if ab.numel() == 1:
            ab = ab.reshape(())
        else:
            if ab.numel() != like.shape[0]:
                raise ValueError(
                    f"got {ab.numel()} timesteps for a batch of {like.shape[0]}: pass one t per batch item or a scalar"
                )
            ab = ab.reshape((-1,) + (1,) * (like.dim() - 1))
        return ab.to(device=like.device, dtype=like.dtype)

    # --- forward process and its inverse ----------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        ab = self.abar(t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def tweedie(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Posterior-mean estimate of x0 from an epsilon prediction."""
        ab = self.abar(t, x_t)
        return (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()

    def sigma_ddim(self, t, t_next, eta: float, like: torch.Tensor) -> torch.Tensor:
        ab = self.abar(t, like)
        ab_n = self.abar(t_next, like, allow_clean=True)
        return eta * ((1 - ab_n) / (1 - ab)).sqrt() * (1 - ab / ab_n).clamp_min(0).sqrt()

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t, t_next, eta: float = 0.0,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t_next} from an (optionally data-consistent) x0 and the network's epsilon."""
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1] (classic convention); got {eta}.")
        ab_n = self.abar(t_next, x0, allow_clean=True)
        sigma = self.sigma_ddim(t, t_next, eta, x0)
        out = ab_n.sqrt() * x0 + (1 - ab_n - sigma ** 2).clamp_min(0).sqrt() * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
            out = out + sigma * noise
        return out

    def timesteps(self, n_steps: int) -> list[int]:
        """n_steps distinct timesteps descending from T-1 to 0 (evenly spaced)."""
        n = int(n_steps)
        if not 1 <= n <= self.T:
            raise ValueError(f"number of sampling steps must be in [1, {self.T}]; got {n_steps}.")
        if n == 1:
            return [self.T - 1]
        step = (self.T - 1) / (n - 1)
        return [int(round(self.T - 1 - i * step)) for i in range(n)]

    def snr(self, t) -> float:
        ab = float(self.alpha_bar[int(t)])
        return ab / (1 - ab)

    def t_for_noise_std(self, sigma: float) -> int:
        """Timestep whose x_t/sqrt(ab) noise std (sqrt((1-ab)/ab)) is closest to ``sigma``."""
        s = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()
        return int(torch.argmin((s - float(sigma)).abs()))

    def __repr__(self) -> str:
        return f"DDPMSchedule(T={self.T}, beta_start={self.beta_start}, beta_end={self.beta_end})"

