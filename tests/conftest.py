import os

import numpy as np
import pytest
import torch

os.environ.setdefault("NAPARI_PETDIFF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "napari-petdiff"))
# Tiny test problems: one thread avoids OpenMP hand-off costs that dominate on a busy 2-core machine.
torch.set_num_threads(1)


def blob_image(n=32, seed=0, nz=1):
    """A smooth positive 'brain-like' blob image on an (nz, n, n) grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    c = (n - 1) / 2
    r = np.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    img = (r < 0.38 * n).astype(np.float32) * 1.0
    img += 3.0 * ((r < 0.30 * n) & (r > 0.20 * n))
    for _ in range(2):
        cy, cx = rng.uniform(0.35 * n, 0.65 * n, size=2)
        img += 2.0 * (np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) < 0.06 * n)
    vol = np.repeat(img[None], nz, axis=0)
    return vol


@pytest.fixture(scope="session")
def small_setup():
    """32x32 image, 2 mm pixels, parallel-beam geometry: the standard tiny problem."""
    from napari_petdiff.engine.geometry import ParallelBeamGeometry
    from napari_petdiff.engine.grid import ImageGrid

    grid = ImageGrid((1, 32, 32), (2.0, 2.0, 2.0))
    geom = ParallelBeamGeometry(n_views=24, n_radial=47, radial_spacing_mm=1.6)
    return grid, geom


@pytest.fixture
def small_acq(small_setup):
    from napari_petdiff.engine.simulate import simulate

    grid, geom = small_setup
    img = blob_image(32)
    mu = (img > 0).astype(np.float32) * 0.0096
    sim = simulate(img, grid, geom, mu, counts=2e4, background_fraction=0.2, seed=1)
    return sim


@pytest.fixture(scope="session")
def tiny_prior():
    from tests.engine._tiny_prior import make_tiny_prior

    return make_tiny_prior(size=32)
