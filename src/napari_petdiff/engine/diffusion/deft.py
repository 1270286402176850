r"""PET-DEFT (Webber et al., MICCAI 2025; DEFT of Denker et al.): a small h-network on a frozen prior.

The conditional noise prediction is ``eps_hat = eps_theta(x_t, t) + h_phi([x_t, x0, g], t)``
(methods.md 8 and 13.8) with, in normalised units,

- ``x0 = max(Tweedie(x_t, eps_theta), 0)``: the frozen prior's non-negative estimate;
- ``g = (EM(c (x0 + delta)) - c (x0 + delta)) / c``: the EM-preconditioned Poisson gradient at it,
  which is dimensionless, so one network serves every count level.

h is a UNet whose two extra input channels are (x0, g) and whose output layer starts at zero, so
an untrained h leaves the unconditional sampler unchanged. It is trained on simulated pairs:
clean phantom slices, Poisson scans at a log-uniform count level with fresh noise at every step,
the sampler's own image scale ``c`` (one OSEM pass), the prior's epsilon loss with the frozen
prior inside. ``guidance_image`` is the one definition of g used by training and by sampling.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DataConfig
from .io import MODELS_DIR, list_priors, load_prior, save_prior
from .prior import ScorePrior
from .schedule import DDPMSchedule
from .train import TrainConfig
from .unet import UNet

DEFT_DIR = MODELS_DIR / "deft"
DEFT_KIND = "deft-h-unet-2d"
DEFAULT_DEFT = "brain-fdg-2d-deft"
WATER_MU_PER_MM = 0.0096  # linear attenuation of water at 511 keV


def guidance_image(lik, c: torch.Tensor, x0: torch.Tensor, delta: float, clip: float) -> torch.Tensor:
    """g = ((x0 + delta) / s) A^T(y / ybar - 1) at the physical image c (x0 + delta), divided by c.

    ``x0`` (..., nz, ny, nx) in normalised units, ``c`` broadcastable to it. ``delta`` lets voxels
    at zero grow; ``clip`` bounds the EM ratio where the estimate is far below the data.
    """
    u = lik.mask(c * (x0.clamp_min(0) + delta))
    return torch.nan_to_num(lik.em_direction(u) / c).clamp(-clip, clip)


def slice_mu(activity: torch.Tensor, margin_px: int = 3) -> torch.Tensor:
    """Water attenuation over the activity support widened by a few pixels (scalp and skull)."""
    supp = (activity > 0).float()
    k = 2 * margin_px + 1
    grown = F.max_pool2d(supp.reshape(1, 1, *supp.shape[-2:]), k, stride=1, padding=margin_px)
    return grown.reshape(supp.shape) * WATER_MU_PER_MM


@dataclass
class DeftConfig(TrainConfig):
    """Training config of a DEFT h-network (TrainConfig fields describe h and the optimiser)."""
    out: str = "training/deft"
    name: str = "deft"
    prior: str = "brain-fdg-2d"          # the frozen prior h is trained on (and must be sampled with)
    counts_range: tuple = (1e4, 3e6)     # total trues per slice, drawn log-uniformly
    background_range: tuple = (0.1, 0.5)  # randoms + scatter as a fraction of the trues, uniform
    delta: float = 0.01
    guidance_clip: float = 10.0
    scale_threshold: float = 0.05        # as SamplingParams.scale_threshold: the sampler's scale c
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    bf16: bool = False
    base_channels: int = 16
    channel_mult: tuple = (1, 2, 2, 2)
    attention_resolutions: tuple = ()
    loss_weighting: str = "trunc-snr"
    # DEFT learns from axial slices: the data term is per axial plane (direct-plane sinograms)
    data: DataConfig = field(default_factory=lambda: DataConfig(orientation_probs=(1.0, 0.0, 0.0)))

    def arch(self) -> dict:
        a = super().arch()
        a["cond_channels"] = 2  # (x0, g) next to x_t
        return a

    def validate_inputs(self) -> None:
        lo, hi = (float(v) for v in self.counts_range)
        if not 0 < lo <= hi:
            raise ValueError(f"counts_range must be (low, high) with 0 < low <= high; got {self.counts_range}")
        blo, bhi = (float(v) for v in self.background_range)
        if not 0 <= blo <= bhi < 100:
            raise ValueError(f"background_range must be (low, high) with 0 <= low <= high; got {self.background_range}")
        if self.delta < 0 or self.guidance_clip <= 0:
            raise ValueError(f"delta must be >= 0 and guidance_clip > 0; got {self.delta}, {self.guidance_clip}")
        if self.init_from:
            raise ValueError("DEFT's h-network always starts at zero output; init_from does not apply")
        if self.cond_channels:
            raise ValueError("DEFT's h-network has fixed extra inputs (x0, g); cond_channels does not apply")
        if self.data.orientation_probs[0] <= 0:
            raise ValueError("DEFT trains on axial slices: data.orientation_probs must give xy a positive weight")
        self.data.with_mr = False

    @classmethod
    def from_dict(cls, d: dict) -> "DeftConfig":
        d = dict(d)
        for k in ("counts_range", "background_range"):
            if k in d:
                d[k] = tuple(d[k])
        return super().from_dict(d)

    def make_task(self, device) -> "DeftTask":
        return DeftTask(self, device)


class DeftTask:
    """Targets: a simulated scan per slice; prediction: frozen prior + h (see the module doc)."""

    def __init__(self, cfg: DeftConfig, device: torch.device):
        from ..grid import ImageGrid
        from ..samples import geometry_for

        self.cfg, self.device = cfg, device
        self.prior = load_prior(cfg.prior, device=device)
        for p in self.prior.net.parameters():
            p.requires_grad_(False)
        if self.prior.cond_channels:
            raise ValueError(f"DEFT needs an unconditional prior; {cfg.prior!r} is MR-conditioned")
        n = cfg.data.image_size
        if self.prior.image_size != n or abs(self.prior.voxel_size_mm - cfg.data.voxel_size_mm) > 1e-6:
            raise ValueError(f"prior {cfg.prior!r} is {self.prior.image_size}x{self.prior.image_size} at "
                             f"{self.prior.voxel_size_mm} mm but the DEFT data are {n}x{n} at "
                             f"{cfg.data.voxel_size_mm} mm: set --image-size/--voxel-size to the prior's")
        if self.prior.schedule.to_dict() != DDPMSchedule(cfg.T, cfg.beta_start, cfg.beta_end).to_dict():
            raise ValueError("the DEFT schedule (T, beta_start, beta_end) must be the prior's")
        vs = float(cfg.data.voxel_size_mm)
        self.grid = ImageGrid((1, n, n), (vs, vs, vs))
        self.geometry = geometry_for(self.grid)

    def init_net(self, net: UNet) -> None:
        pass  # UNet's output layer is zero-initialised: h = 0, the unconditional sampler

    def simulate_pair(self, activity: torch.Tensor, counts: float, background: float, seed: int):
        """(x0 = truth / c, likelihood, c) for one normalised clean slice (H, W)."""
        from ..likelihood import PoissonLikelihood
        from ..samplers.core import osem_scale
        from ..simulate import simulate

        act = activity.clamp_min(0).cpu()
        sim = simulate(act[None], self.grid, self.geometry, slice_mu(act)[None], counts=counts,
                       background_fraction=background, seed=seed, device=self.device)
        lik = PoissonLikelihood(sim.acquisition, 1, device=self.device)
        c, _ = osem_scale(lik, self.cfg.scale_threshold, None)
        return sim.truth.to(self.device) / c, lik, c

    def draws(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Per slice: count level, background fraction (as uniforms) and the Poisson seed."""
        u = torch.rand((n, 2), generator=gen, dtype=torch.float64)
        seeds = torch.randint(0, 2 ** 31 - 1, (n, 1), generator=gen).double()
        return torch.cat([u, seeds], dim=1)

    def targets(self, batch: torch.Tensor, draws: torch.Tensor):
        cfg = self.cfg
        lo, hi = (math.log(float(v)) for v in cfg.counts_range)
        blo, bhi = (float(v) for v in cfg.background_range)
        x0s, ctx = [], []
        for i in range(batch.shape[0]):
            if not (batch[i, 0] > 0).any():
                raise ValueError("a training slice is empty; raise data.min_support")
            counts = math.exp(lo + (hi - lo) * float(draws[i, 0]))
            x0, lik, c = self.simulate_pair(batch[i, 0], counts, blo + (bhi - blo) * float(draws[i, 1]),
                                            int(draws[i, 2]))
            x0s.append(x0)          # (1, H, W): one axial plane
            ctx.append((lik, c))
        return torch.stack(x0s), ctx

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
        cfg = self.cfg
        with torch.no_grad():
            eps0 = self.prior.eps(x_t, t)
            x0 = self.prior.schedule.tweedie(x_t, eps0, t).clamp_min(0)
            g = torch.stack([guidance_image(lik, c, x0[i], cfg.delta, cfg.guidance_clip)
                             for i, (lik, c) in enumerate(ctx)])
        mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        cond = torch.cat([x0, g], dim=1).contiguous(memory_format=mf)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            h = model(x_t, t, cond)
        return eps0 + h.float()

    def export(self, ema: dict, step: int, wall_s: float, loss_recent: float, world: int) -> Path:
        cfg = self.cfg
        net = UNet(**cfg.arch())
        net.load_state_dict(ema)
        h = ScorePrior(net, self.prior.schedule, name=cfg.name, image_size=cfg.data.image_size,
                       voxel_size_mm=cfg.data.voxel_size_mm, normalisation=self.prior.normalisation)
        stem = Path(cfg.export_to) if cfg.export_to else Path(cfg.out) / cfg.name
        extra = {
            "kind": DEFT_KIND,
            "description": cfg.description or f"PET-DEFT h-network for the prior {self.prior.name}",
            "steps": step, "wall_time_s": round(wall_s, 1),
            "weights": "EMA" if step > cfg.ema_start else "raw (EMA not started)",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_prior": {"name": self.prior.name, "weights_sha256": self.prior.card.get("weights_sha256"),
                           "steps": self.prior.card.get("steps")},
            "deft": {"inputs": ["x_t", "max(tweedie, 0)", "EM-preconditioned Poisson gradient g"],
                     "delta": cfg.delta, "guidance_clip": cfg.guidance_clip,
                     "scale_threshold": cfg.scale_threshold, "counts_range": list(cfg.counts_range),
                     "background_range": list(cfg.background_range),
                     "geometry": "brain scanner, direct planes (samples.geometry_for)",
                     "attenuation": "water over the slice support grown by 3 pixels"},
            "training": {"loss_recent_mean": loss_recent, "batch_size": cfg.batch_size, "lr": cfg.lr,
                         "lr_schedule": cfg.lr_schedule, "loss_weighting": cfg.loss_weighting,
                         "ema_decay": cfg.ema_decay, "seed": cfg.seed, "world_size": world,
                         "pairs_seen": step * cfg.batch_size, "data": cfg.data.to_dict(),
                         "loss": "MSE(eps, eps_prior(x_t, t) + h(x_t, x0, g, t)), fresh Poisson noise per step"},
        }
        return save_prior(h, stem, extra)


# --- shipped networks ---------------------------------------------------------------------------
def list_deft(models_dir=None) -> list[dict]:
    """Cards of the DEFT h-networks (shipped ones by default)."""
    return [c for c in list_priors(models_dir if models_dir is not None else DEFT_DIR) if c.get("kind") == DEFT_KIND]


def load_deft(name_or_path, prior: ScorePrior, device=None, models_dir=None) -> ScorePrior:
    """An h-network by shipped name or path, checked against the prior it will be added to."""
    d = Path(models_dir) if models_dir is not None else DEFT_DIR
    s = str(name_or_path)
    is_name = "/" not in s and not s.endswith((".safetensors", ".json"))
    if is_name and not (d / f"{s}.json").exists():
        known = [c["name"] for c in list_deft(d)]
        raise ValueError(f"unknown DEFT network {s!r}. Shipped: {', '.join(known) or '(none)'}; or pass the path "
                         "of a .safetensors file written by `petdiff train-deft`")
    h = load_prior(s, device=device, models_dir=d)
    if h.card.get("kind") != DEFT_KIND:
        raise ValueError(f"{s!r} is not a DEFT h-network (its card says kind {h.card.get('kind')!r})")
    if h.net.cond_channels != 2:
        raise ValueError(f"DEFT network {s!r} must take (x0, g) as 2 extra channels; it takes {h.net.cond_channels}")
    base = h.card.get("base_prior", {})
    if base.get("weights_sha256") and base["weights_sha256"] != prior.card.get("weights_sha256"):
        raise ValueError(f"DEFT network {s!r} was trained on the prior {base.get('name')!r} "
                         f"(sha256 {str(base['weights_sha256'])[:12]}...) but the prior given is {prior.name!r} "
                         f"(sha256 {str(prior.card.get('weights_sha256'))[:12]}...): use --prior {base.get('name')} "
                         "or retrain with `petdiff train-deft --prior ...`")
    return h


def h_volume(h: ScorePrior, x_t: torch.Tensor, x0: torch.Tensor, g: torch.Tensor, t: int, chunk: int = 16,
             generator=None) -> torch.Tensor:
    """h for (S, nz, ny, nx) volumes, axial slice by slice (as it was trained)."""
    S, nz, ny, nx = x_t.shape
    flat = x_t.reshape(S * nz, 1, ny, nx)
    cond = torch.stack([x0, g], dim=2).reshape(S * nz, 2, ny, nx)
    outs = [h.eps(flat[i:i + chunk], t, cond[i:i + chunk], generator=generator)
            for i in range(0, flat.shape[0], chunk)]
    return torch.cat(outs).reshape(S, nz, ny, nx)

