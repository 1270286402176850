"""Reconstruction-time adaptation of the prior's network (DDIP-HQS, steerable LiSch).

The adapter works on a private copy of the prior, so the shared (cached) prior is never
modified, and a run that fails or is cancelled cannot leave adapted weights behind. Modes
(methods.md 5.2 / 6.1): ``lora`` (rank-r adapters on the convolutions and linear layers inside
the residual and attention blocks, as DDIP and SCD do), ``decoder`` (the up-sampling path and
the output layer), ``full`` (every weight).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch

from ..params import param

ADAPT_MODES = ("lora", "decoder", "full")
LORA_BLOCKS = ("down.", "mid.", "up.")  # the UNet's residual/attention blocks, not its resampling convs
_DECODER = ("up.", "out_norm.", "out.")


class NetworkAdapter:
    """Trainable copy of a ScorePrior with an Adam optimiser; ``restart()`` per new sample batch."""

    def __init__(self, prior, mode: str = "lora", rank: int = 4, lr: float = 1e-3, seed: int = 0):
        if mode not in ADAPT_MODES:
            raise ValueError(f"adaptation mode must be one of {list(ADAPT_MODES)}; got {mode!r}")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}")
        if not lr > 0:
            raise ValueError(f"the adaptation learning rate must be > 0; got {lr}")
        self.mode, self.rank, self.lr = mode, int(rank), float(lr)
        self.prior = copy.deepcopy(prior)
        self.prior.remove_lora()
        net = self.prior.net
        for p in net.parameters():
            p.requires_grad_(False)
        if mode == "lora":
            with torch.random.fork_rng(devices=[]):  # seeded adapter init: runs are reproducible
                torch.manual_seed(int(seed))
                self.lora = self.prior.add_lora(self.rank, targets=LORA_BLOCKS)
            self.params = list(self.lora.parameters())
        else:
            self.lora = None
            self.params = [p for n, p in net.named_parameters() if mode == "full" or n.startswith(_DECODER)]
            if not self.params:
                raise ValueError("the prior's network has no decoder layers to adapt; use adapt='lora' or 'full'")
            for p in self.params:
                p.requires_grad_(True)
        self._base = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self._lora0 = self.lora.state_dict() if self.lora is not None else None
        self.opt = torch.optim.Adam(self.params, lr=self.lr)
        self.losses: list[float] = []

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def restart(self) -> None:
        """Back to the unadapted network (exactly) with a fresh optimiser."""
        with torch.no_grad():
            if self.lora is not None:
                self.lora.load_state_dict(self._lora0)
            else:
                self.prior.net.load_state_dict(self._base)
        self.opt = torch.optim.Adam(self.params, lr=self.lr)

    @contextlib.contextmanager
    def base(self):
        """The unadapted network's predictions (SCD uses them for the DDIM noise direction)."""
        if self.lora is not None:
            with self.lora.disabled():
                yield self.prior
            return
        adapted = {k: v.detach().clone() for k, v in self.prior.net.state_dict().items()}
        with torch.no_grad():
            self.prior.net.load_state_dict(self._base)
        try:
            yield self.prior
        finally:
            with torch.no_grad():
                self.prior.net.load_state_dict(adapted)

    def fit(self, loss_fn: Callable[[], torch.Tensor], iterations: int, cancel=None) -> list[float]:
        """``iterations`` Adam steps on ``loss_fn()``; the losses before each step."""
        out = []
        for _ in range(int(iterations)):
            if cancel is not None:
                cancel.raise_if_cancelled()
            self.opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn()
                if not torch.isfinite(loss):
                    raise FloatingPointError("the adaptation loss is not finite: lower the learning rate")
                loss.backward()
            self.opt.step()
            out.append(float(loss.detach()))
        self.losses.extend(out)
        return out


def random_slices(nz: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct axial slice indices (all of them when k >= nz): Monte-Carlo fitting as in DDIP."""
    if k >= nz:
        return torch.arange(nz)
    return torch.randperm(nz, generator=gen)[:k].sort().values


@dataclass
class AdaptationParams:
    """Fields shared by the methods that adapt the network while sampling."""
    adapt: str = param("lora", "what is fine-tuned: LoRA adapters, the decoder, or the whole network",
                       choices=ADAPT_MODES)
    rank: int = param(4, "LoRA rank (adapt = lora)", min=1, max=64, advanced=True)
    lr: float = param(1e-3, "Adam learning rate of the adaptation", min=1e-7, max=1.0)
    fit_iterations: int = param(5, "Adam steps per adapted diffusion step (F)", min=1, max=100)
    fit_slices: int = param(4, "3-D only: axial slices per Adam step (Monte-Carlo, as in DDIP)", min=1,
                            max=1024, advanced=True)


def make_adapter(params: AdaptationParams):
    return lambda prior: NetworkAdapter(prior, params.adapt, params.rank, params.lr, seed=params.seed)


def adapted_tweedie(adapter: NetworkAdapter, x_t: torch.Tensor, t: int, idx: torch.Tensor,
                    generator=None, cond=None, guidance: float = 0.0) -> torch.Tensor:
    """Tweedie estimate of axial slices ``idx`` of (S, nz, ny, nx) with the autograd graph kept;
    ``cond``: the MR volume (1 or S, nz, ny, nx) of an MR-conditioned prior."""
    xs = x_t[:, idx]
    kw = {} if cond is None else {"cond": cond[:, idx].expand_as(xs), "guidance": guidance}
    eps = adapter.prior.eps_volume(xs, t, orientation="xy", grad=True, generator=generator, **kw)
    return adapter.prior.schedule.tweedie(xs, eps, t)
