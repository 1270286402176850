"""LoRA adapters attached to Conv2d/Linear layers through forward hooks.

The base modules are not replaced, so the network's state_dict (and the shipped weights) never
change; ``reset()`` removes the hooks and restores the original function exactly. B starts at
zero, so right after injection the adapted network computes exactly what the original does.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
import torch.nn as nn


class _Adapter(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                               base.dilation, bias=False)
            self.B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.A = nn.Linear(base.in_features, rank, bias=False)
            self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        p = base.weight
        self.to(device=p.device, dtype=p.dtype)
        if p.dim() == 4 and not p.is_contiguous():  # follow a channels_last base network
            self.to(memory_format=torch.channels_last)
        self.scale = float(alpha) / float(rank)
        self.enabled = True

    def hook(self, module, inputs, output):
        if not self.enabled:
            return output
        return output + self.scale * self.B(self.A(inputs[0]))


class LoRA:
    """Adapters on every Conv2d/Linear of ``net`` whose name contains one of ``targets`` (all if None)."""

    def __init__(self, net: nn.Module, rank: int = 4, alpha: float | None = None,
                 targets: Iterable[str] | None = None, freeze_base: bool = True):
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}")
        self.net, self.rank = net, int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        targets = list(targets) if targets is not None else None
        self.adapters = nn.ModuleDict()
        self._handles = []
        self._frozen = []
        for name, mod in net.named_modules():
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                continue
            if targets is not None and not any(t in name for t in targets):
                continue
            ad = _Adapter(mod, self.rank, self.alpha)
            self.adapters[name.replace(".", "__")] = ad
            self._handles.append(mod.register_forward_hook(ad.hook))
        if not self._handles:
            raise ValueError(f"no Conv2d/Linear layer matched the LoRA targets {targets}; "
                             "pass targets=None to adapt every layer")
        if freeze_base:
            for p in net.parameters():
                if p.requires_grad:
                    self._frozen.append(p)
                    p.requires_grad_(False)

    def parameters(self):
        return self.adapters.parameters()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters() if p.requires_grad)

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.adapters.state_dict().items()}

    def load_state_dict(self, sd: dict) -> None:
        self.adapters.load_state_dict(sd)

    def zero_(self) -> None:
        """Back to the identity (B = 0) without removing the hooks: re-use one adapter per sample."""
        with torch.no_grad():
            for ad in self.adapters.values():
                ad.B.weight.zero_()

    @contextlib.contextmanager
    def disabled(self):
        """The base network's prediction with the adapters kept (SCD's unadapted epsilon)."""
        for ad in self.adapters.values():
            ad.enabled = False
        try:
            yield self
        finally:
            for ad in self.adapters.values():
                ad.enabled = True

    def reset(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "LoRA":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()


def inject_lora(net: nn.Module, rank: int = 4, alpha: float | None = None, targets=None) -> LoRA:
    return LoRA(net, rank, alpha, targets)
