"""Fixtures for the plugin tests: a tiny fake acquisition and fake methods registered per test.

The fake methods follow the run protocol exactly (Progress / Intermediate / Sample events, cooperative
cancel, Result with mean/std/samples) but need no projector, so widget logic is tested fast and
deterministically; the real engine is exercised by the OSEM tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from napari_petdiff.engine import methods
from napari_petdiff.engine.acquisition import Acquisition
from napari_petdiff.engine.geometry import ParallelBeamGeometry
from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.params import param
from napari_petdiff.engine.run import Intermediate, Progress, Result, RunWarning, Sample


def small_scan(nz: int = 1, n: int = 32, name: str = "small", counts: float = 2e4):
    """A tiny simulated scan on a parallel-beam geometry: (Acquisition, truth) of a hot disk in a warm disk."""
    from napari_petdiff.engine.simulate import simulate

    grid = ImageGrid((nz, n, n), (2.0, 2.0, 2.0))
    geom = ParallelBeamGeometry(n_views=16, n_radial=n + 8, radial_spacing_mm=2.0, n_planes=nz, plane_spacing_mm=2.0)
    y, x = np.mgrid[:n, :n] - (n - 1) / 2.0
    r = np.hypot(y, x)
    act = np.where(r < n * 0.4, 1.0, 0.0) + np.where(np.hypot(y - n * 0.1, x) < n * 0.1, 3.0, 0.0)
    act = np.broadcast_to(act, (nz, n, n)).astype(np.float32)
    sim = simulate(act, grid, geom, None, counts=counts, background_fraction=0.2, seed=3,
                   metadata={"name": name})
    return sim.acquisition, sim.truth


def fake_acquisition(nz: int = 1, n: int = 16, name: str = "fake") -> Acquisition:
    """Prompts only (no projector needed): for widget logic with the fake methods."""
    grid = ImageGrid((nz, n, n), (2.0, 2.0, 2.0))
    geom = ParallelBeamGeometry(n_views=6, n_radial=n + 8, radial_spacing_mm=2.0, n_planes=nz, plane_spacing_mm=2.0)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.poisson(torch.full(geom.sinogram_shape, 5.0), generator=gen)
    return Acquisition(prompts, geom, grid, metadata={"name": name})


@dataclass
class FakeParams:
    steps: int = param(5, "number of steps", min=1, max=1_000_000)
    delay: float = param(0.0, "sleep per step", min=0.0, max=10.0, unit="s")
    fail_at: int = param(-1, "raise a ValueError at this step (-1: never)", min=-1)
    samples: int = param(2, "posterior samples", min=1, max=8)
    seed: int = param(0, "random seed", min=0)
    warn: bool = param(False, "emit a RunWarning", advanced=True)


def run_fake(acq, p: FakeParams, cancel, device=None):
    gen = torch.Generator().manual_seed(p.seed)
    base = torch.rand(acq.grid.shape, generator=gen)
    for k in range(p.steps):
        cancel.raise_if_cancelled()
        if p.delay:
            time.sleep(p.delay)
        if k == p.fail_at:
            raise ValueError(f"fake failure at step {k}: set fail_at to -1 to fix")
        yield Progress(k + 1, p.steps, f"fake step {k + 1}/{p.steps}", "fake")
        yield Intermediate(base * (k + 1) / p.steps, k + 1, "fake")
    if p.warn:
        yield RunWarning("fake warning")
    samples = torch.stack([base + 0.1 * torch.rand(acq.grid.shape, generator=gen) for _ in range(p.samples)])
    for i in range(p.samples):
        yield Sample(i, samples[i])
    return Result(mean=samples.mean(0), std=samples.std(0) if p.samples > 1 else None, samples=samples,
                  likelihood=[float(k) for k in range(p.steps + 1)], metadata={"seed": p.seed})


@dataclass
class FakeTargetParams:
    target_iteration: float = param(4.0, "MLEM iteration whose likelihood to reach", min=0.0, max=50.0)
    samples: int = param(1, "posterior samples", min=1, max=4)


def run_fake_target(acq, p: FakeTargetParams, cancel, device=None):
    yield Progress(1, 1, "done", "fake")
    return Result(mean=torch.ones(acq.grid.shape))


FAKE = methods.MethodSpec("fake", run_fake, FakeParams, "fake method for tests", family="diffusion", samples=True)
FAKE_TARGET = methods.MethodSpec("fake-target", run_fake_target, FakeTargetParams, "fake likelihood-target method",
                                 family="diffusion", samples=True)


@pytest.fixture
def fake_methods():
    methods.list_methods()  # load the real registry first so ours are added, not replaced
    for spec in (FAKE, FAKE_TARGET):
        methods.register(spec)
    yield (FAKE, FAKE_TARGET)
    for spec in (FAKE, FAKE_TARGET):
        methods._REGISTRY.pop(spec.name, None)


def add_layer_data(viewer, layer_data):
    out = []
    for data, kwargs, kind in layer_data:
        out.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return out


@pytest.fixture
def model_viewer():
    """A canvas-less viewer model holding one fake acquisition and its 'truth'."""
    from napari.components import ViewerModel

    from napari_petdiff._widgets.layers import acquisition_layer_data

    viewer = ViewerModel()
    acq = fake_acquisition()
    truth = torch.rand(acq.grid.shape, generator=torch.Generator().manual_seed(2))
    add_layer_data(viewer, acquisition_layer_data(acq, {"truth": truth}, name="fake"))
    return viewer


@pytest.fixture(autouse=True)
def _no_leftover_runs(qtbot):
    """Every test ends with no engine run still going (a left-over worker would leak into the next test)."""
    yield
    from napari_petdiff._widgets import run_session

    for s in list(run_session._ACTIVE):
        s.cancel()
    qtbot.waitUntil(lambda: not run_session._ACTIVE, timeout=10_000)


def slow_values():
    return {"steps": 1_000_000, "delay": 0.005}


def np_close(a, b):
    return np.allclose(np.asarray(a), np.asarray(b))
