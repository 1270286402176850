"""A tiny trained ScorePrior for the samplers' tests: seconds to train, cached per test session.

The images are 32x32 "heads": a disc with a hot rim and 1-3 blobs, normalised like the real
training data (divided by the mean over the support, then x U(0.5, 1.5)).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from napari_petdiff.engine.diffusion.prior import ScorePrior
from napari_petdiff.engine.diffusion.schedule import DDPMSchedule
from napari_petdiff.engine.diffusion.unet import UNet


def blob_images(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """(n, 1, size, size) float32 phantom-like images with zero background."""
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    out = np.zeros((n, 1, size, size), np.float32)
    for k in range(n):
        a, b = rng.uniform(0.55, 0.8, 2)
        cy, cx = rng.uniform(-0.08, 0.08, 2)
        r = np.sqrt(((y - cy) / a) ** 2 + ((x - cx) / b) ** 2)
        img = np.where(r < 1, 1.0, 0.0) + np.where((r > 0.75) & (r < 1), rng.uniform(1.5, 4.0), 0.0)
        for _ in range(rng.integers(1, 4)):
            by, bx = rng.uniform(-0.4, 0.4, 2)
            d = np.hypot(y - by, x - bx)
            img = img + np.where((d < rng.uniform(0.08, 0.2)) & (r < 1), rng.uniform(0.5, 2.0), 0.0)
        img = img / img[img > 0].mean() * rng.uniform(0.5, 1.5)
        out[k, 0] = img
    return out


@functools.lru_cache(maxsize=4)
def make_tiny_prior(size: int = 32, steps: int = 60, seed: int = 0) -> ScorePrior:
    """Tiny UNet (base 8, three levels) trained ``steps`` Adam steps on blob images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention on a shared machine
    try:
        return _train_tiny(size, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(size: int, steps: int, seed: int) -> ScorePrior:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = UNet(base_channels=8, channel_mult=(1, 2, 2), attention_resolutions=(size // 4,), image_size=size)
    sched = DDPMSchedule()
    data = torch.from_numpy(blob_images(np.random.default_rng(seed), 256, size))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ab = sched.alpha_bar.float()
    net.train()
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (16,), generator=g)]
        t = torch.randint(0, sched.T, (16,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)  # samplers' tests use it for inference; LoRA re-enables what it needs
    return ScorePrior(net.eval(), sched, name=f"tiny-{size}", image_size=size, voxel_size_mm=2.0,
                      card={"description": f"test prior: {steps} steps on {size}x{size} blobs"})
