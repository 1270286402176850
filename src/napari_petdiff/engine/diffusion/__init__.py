"""Diffusion slice priors: DDPM schedule, UNet, ScorePrior (+ LoRA), prior files, training."""
from .io import list_priors, load_prior, save_prior
from .lora import LoRA, inject_lora
from .prior import ScorePrior
from .registry import DEFAULT_PRIOR, get_prior, shipped_prior_names
from .schedule import DDPMSchedule
from .unet import UNet

__all__ = ["DDPMSchedule", "UNet", "ScorePrior", "LoRA", "inject_lora", "save_prior", "load_prior",
           "list_priors", "get_prior", "shipped_prior_names", "DEFAULT_PRIOR"]
