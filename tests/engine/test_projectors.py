import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from napari_petdiff.engine.geometry import ParallelBeamGeometry, RingScannerGeometry
from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.operators import GaussianPSF, SinogramScaling, attenuation_factors
from napari_petdiff.engine.projectors import (BackendUnavailableError, ListmodeProjector, MatrixFreeJosephProjector,
                                              ParallelprojProjector, SparseJosephProjector, default_cache_dir,
                                              make_projector)
from napari_petdiff.engine.projectors import matrix_free, sparse_joseph

F64 = torch.float64
VOX = (3.0, 4.0, 5.0)   # anisotropic voxels (z, y, x) mm


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread avoids OpenMP stalls when the shared cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ring(n_rings=1, mrd=0):
    return RingScannerGeometry(80.0, 12, 6, 7.0, n_rings=n_rings, ring_spacing_mm=VOX[0],
                               max_ring_difference=mrd, radial_trim=16)


def grid(nz=1):
    return ImageGrid((nz, 24, 20), VOX)


def proj(geo, g, backend, **kw):
    return make_projector(geo, g, backend=backend, cache_dir=False, dtype=F64, **kw)


def rand_image(g, seed=0, batch=()):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(batch) + g.shape, generator=gen, dtype=F64)


def disk_fraction_image(g: ImageGrid, r: float, ss: int = 8) -> np.ndarray:
    """Fraction of each voxel inside the centred disk of radius r (supersampled)."""
    _, ny, nx = g.shape
    _, vy, vx = g.voxel_size
    cy = g.origin[1] + (np.arange(ny * ss) + 0.5) / ss * vy - vy / 2
    cx = g.origin[2] + (np.arange(nx * ss) + 0.5) / ss * vx - vx / 2
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    inside = (yy ** 2 + xx ** 2 <= r * r).astype(np.float64)
    return inside.reshape(ny, ss, nx, ss).mean((1, 3))[None]


def lor_distance(geo):
    s, e = geo.inplane_endpoints()
    d = e - s
    return np.abs(s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]) / np.linalg.norm(d, axis=-1)


# --- adjointness (float64, anisotropic voxels) -----------------------------------------------

@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_adjoint_2d(backend):
    assert proj(ring(), grid(), backend).adjointness_test() < 1e-10


@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_adjoint_25d_stack(backend):
    p = proj(ring(3), grid(3), backend)
    assert p.out_shape == (3, 36, 41)
    assert p.adjointness_test(seed=1) < 1e-10


def test_adjoint_oblique_3d():
    geo = ring(4, mrd=2)
    p = proj(geo, grid(4), "auto")
    assert isinstance(p, MatrixFreeJosephProjector)
    assert p.out_shape == (geo.n_planes, 36, 41)
    assert p.adjointness_test(seed=2) < 1e-10


def test_adjoint_composite_psf_scaling_projector():
    g = grid(3)
    p = proj(ring(3), g, "sparse")
    gen = torch.Generator().manual_seed(3)
    f = torch.rand(p.out_shape, generator=gen, dtype=F64) + 0.1
    op = SinogramScaling(f) @ p @ GaussianPSF(g, (4.0, 5.0, 6.0))
    assert op.in_shape == g.shape and op.out_shape == p.out_shape
    assert op.adjointness_test() < 1e-10
    sub = op.subset(torch.tensor([1, 5, 9]))
    assert sub.out_shape == (3, 3, 41)
    assert sub.adjointness_test() < 1e-10
    x = rand_image(g)
    torch.testing.assert_close(sub.apply(x), op.apply(x)[:, [1, 5, 9]])


@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_adjoint_subsets(backend):
    p = proj(ring(3), grid(3), backend)
    for views in (torch.tensor([0, 4, 8, 12]), torch.tensor([30, 3, 17])):   # ascending and not
        sub = p.subset(views)
        assert sub.out_shape == (3, len(views), 41)
        assert sub.adjointness_test() < 1e-10


def random_events(n, seed=0, radius=80.0, half_z=10.0):
    """Events between random points on a cylinder, plus a few steep (z-principal) ones."""
    rng = np.random.default_rng(seed)
    phi = rng.uniform(0, 2 * np.pi, (n, 2))
    z = rng.uniform(-half_z, half_z, (n, 2))
    pts = np.stack([z, radius * np.sin(phi), radius * np.cos(phi)], axis=-1)
    xs, xe = pts[:, 0], pts[:, 1]
    steep = np.array([[-40.0, 3.0, -2.0], [-40.0, -7.0, 11.0], [-30.0, 0.0, 0.0]])
    xs = np.concatenate([xs, steep])
    xe = np.concatenate([xe, steep * np.array([-1.0, 1.0, 0.5])])
    return xs, xe


def test_adjoint_listmode():
    xs, xe = random_events(300)
    lm = ListmodeProjector(xs, xe, grid(4))
    assert lm.out_shape == (303,)
    assert lm.adjointness_test() < 1e-10
    sub = lm.subset(torch.arange(0, 303, 3))
    assert sub.out_shape == (101,) and sub.adjointness_test() < 1e-10


# --- exact chord lengths -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_chords_along_axes_anisotropic(backend):
    g = ImageGrid((1, 20, 16), (2.0, 2.5, 2.0))
    geo = ParallelBeamGeometry(2, 61, 1.0, angles=[0.0, np.pi / 2])
    s = proj(geo, g, backend).apply(torch.ones(g.shape, dtype=F64))[0]
    t = geo.radial_positions_mm()
    inside_x = np.abs(t) <= 15.0            # between the outer column centres
    torch.testing.assert_close(s[0, inside_x], torch.full((int(inside_x.sum()),), 20 * 2.5, dtype=F64))
    inside_y = np.abs(t) <= 20.0
    torch.testing.assert_close(s[1, inside_y], torch.full((int(inside_y.sum()),), 16 * 2.0, dtype=F64))
    assert s[0, np.abs(t) >= 17.0].abs().max() == 0       # past the image edge + one voxel


@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_chords_at_45_degrees_including_corner_clipping(backend):
    n, v = 16, 2.0
    g = ImageGrid((1, n, n), (v, v, v))
    geo = ParallelBeamGeometry(2, 35, v / math.sqrt(2), angles=[np.pi / 4, 3 * np.pi / 4])
    s = proj(geo, g, backend).apply(torch.ones(g.shape, dtype=F64))[0]
    k = np.arange(35) - 17       # ray offset in voxels from the diagonal
    exact = math.sqrt(2) * v * np.clip(n - np.abs(k), 0, None)
    for view in range(2):
        np.testing.assert_allclose(s[view].numpy(), exact, rtol=1e-12, atol=1e-9)
    assert exact[17] == pytest.approx(n * v * math.sqrt(2))


def test_listmode_chords_3d_and_segments_ending_inside():
    g = ImageGrid((6, 8, 10), (3.0, 2.0, 2.0))
    cz, cy, cx = (g.voxel_centres(a) for a in range(3))
    xs = np.array([
        [-50.0, cy[2], cx[3]],       # along z through voxel centres
        [cz[1], cy[5], -50.0],       # along x
        [cz[2], cy[4], -7.3],        # along x, both ends inside the image
        [cz[2], cy[4], -30.0],       # along x, ends inside
        [-50.0, cy[1], -50.0],       # outside the image entirely
    ])
    xe = np.array([
        [50.0, cy[2], cx[3]],
        [cz[1], cy[5], 50.0],
        [cz[2], cy[4], 4.1],
        [cz[2], cy[4], 1.0],
        [-40.0, cy[1], 50.0],
    ])
    out = ListmodeProjector(xs, xe, g).apply(torch.ones(g.shape, dtype=F64))
    np.testing.assert_allclose(out.numpy(), [6 * 3.0, 10 * 2.0, 11.4, 1.0 + 10.0, 0.0], rtol=1e-12, atol=1e-12)


# --- analytic disk ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_disk_line_integrals_parallel_beam(backend):
    g = ImageGrid((1, 64, 64), (2.0, 2.0, 2.0))
    r = 50.0
    img = torch.from_numpy(disk_fraction_image(g, r))
    geo = ParallelBeamGeometry(24, 91, 1.5)
    s = proj(geo, g, backend).apply(img)[0].numpy()
    t = geo.radial_positions_mm()
    exact = np.broadcast_to(2 * np.sqrt(np.clip(r * r - t ** 2, 0, None)), s.shape)
    assert np.sqrt(np.mean((s - exact) ** 2)) / np.sqrt(np.mean(exact ** 2)) < 0.01


def mid_ring():
    return RingScannerGeometry(150.0, 24, 8, 4.9, radial_trim=50)


def test_disk_line_integrals_ring_scanner():
    g = ImageGrid((1, 64, 64), (3.0, 2.0, 2.0))
    r = 60.0
    img = torch.from_numpy(disk_fraction_image(g, r))
    geo = mid_ring()
    s = proj(geo, g, "sparse").apply(img)[0].numpy()
    exact = 2 * np.sqrt(np.clip(r * r - lor_distance(geo) ** 2, 0, None))
    assert np.sqrt(np.mean((s - exact) ** 2)) / np.sqrt(np.mean(exact ** 2)) < 0.01


@pytest.mark.parametrize("vox", [(2.0, 1.5, 2.0), (2.0, 2.0, 3.0)])
def test_gaussian_blob_line_integrals_anisotropic(vox):
    g = ImageGrid((1, int(128 / vox[1]), int(128 / vox[2])), vox)
    sig, c0 = 8.0, np.array([7.0, -5.0])
    yy, xx = np.meshgrid(g.voxel_centres(1), g.voxel_centres(2), indexing="ij")
    img = np.exp(-((yy - c0[0]) ** 2 + (xx - c0[1]) ** 2) / (2 * sig ** 2))[None]
    geo = mid_ring()
    s = proj(geo, g, "matrix-free").apply(torch.from_numpy(img))[0].numpy()
    st, en = geo.inplane_endpoints()
    u = (en - st) / np.linalg.norm(en - st, axis=-1, keepdims=True)
    rel = st - c0
    dist = np.abs(rel[..., 0] * u[..., 1] - rel[..., 1] * u[..., 0])
    exact = math.sqrt(2 * math.pi) * sig * np.exp(-dist ** 2 / (2 * sig ** 2))
    assert np.sqrt(np.mean((s - exact) ** 2)) / np.sqrt(np.mean(exact ** 2)) < 0.01


# --- consistency -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_stack_equals_slices_one_by_one_and_batches(backend):
    g3 = grid(3)
    p3 = proj(ring(3), g3, backend)
    p1 = proj(ring(1), grid(1), backend)
    x = rand_image(g3, batch=(2,))
    y = p3.apply(x)
    for b in range(2):
        for z in range(3):
            torch.testing.assert_close(y[b, z], p1.apply(x[b, z:z + 1])[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p3.adjoint(y)[1], p3.adjoint(y[1]))


@pytest.mark.parametrize("backend", ["sparse", "matrix-free"])
def test_subsets_together_equal_full_projection(backend):
    geo = ring(3)
    p = proj(geo, grid(3), backend)
    x = rand_image(grid(3))
    full = p.apply(x)
    w = torch.randn(p.out_shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    back = torch.zeros_like(x)
    for views in geo.view_subsets(5):
        sub = p.subset(views)
        torch.testing.assert_close(sub.apply(x), full[:, views])
        back += sub.adjoint(w[:, views])
    torch.testing.assert_close(back, p.adjoint(w))
    # subset of a subset indexes into the subset's own views
    s = p.subset(torch.tensor([3, 6, 9, 12])).subset([2, 0])
    torch.testing.assert_close(s.apply(x), full[:, [9, 3]])


def test_sparse_and_matrix_free_agree():
    for geo, g in ((ring(), grid()), (ring(3), grid(3)), (ParallelBeamGeometry(17, 45, 2.3), grid())):
        x = rand_image(g)
        ps, pm = proj(geo, g, "sparse"), proj(geo, g, "matrix-free")
        assert isinstance(ps, SparseJosephProjector) and isinstance(pm, MatrixFreeJosephProjector)
        torch.testing.assert_close(ps.apply(x), pm.apply(x), rtol=1e-10, atol=1e-10)
        y = pm.apply(x)
        torch.testing.assert_close(ps.adjoint(y), pm.adjoint(y), rtol=1e-10, atol=1e-10)


def test_matrix_free_chunking_and_float32_work_precision():
    geo, g = ring(4, mrd=2), grid(4)
    x = rand_image(g, batch=(2,))
    big = MatrixFreeJosephProjector(geo, g, dtype=F64)
    small = MatrixFreeJosephProjector(geo, g, dtype=F64, max_samples=20000)   # ~25 chunks
    torch.testing.assert_close(small.apply(x), big.apply(x), rtol=1e-12, atol=1e-12)
    y = big.apply(x)
    torch.testing.assert_close(small.adjoint(y), big.adjoint(y), rtol=1e-12, atol=1e-12)
    # float32 data uses float32 per-sample arithmetic: still close to the float64 result
    y32 = big.apply(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y, rtol=1e-4, atol=1e-4)


def test_listmode_equals_sinogram_projection():
    geo, g = ring(4, mrd=2), grid(4)
    p = proj(geo, g, "matrix-free")
    xs, xe = geo.lor_endpoints()
    lm = ListmodeProjector(xs.reshape(-1, 3), xe.reshape(-1, 3), g)
    x = rand_image(g)
    torch.testing.assert_close(lm.apply(x), p.apply(x).reshape(-1))


def test_matches_skimage_radon():
    skt = pytest.importorskip("skimage.transform", reason="scikit-image not installed")
    n, px = 64, 2.0
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    img = np.exp(-(((yy - 25) / 7.0) ** 2 + ((xx - 38) / 5.0) ** 2))
    theta = np.arange(0, 180, 6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = skt.radon(img, theta, circle=True).T * px
    geo = ParallelBeamGeometry.from_skimage(theta, ref.shape[1], img.shape, px)
    ours = proj(geo, ImageGrid((1, n, n), (px, px, px)), "sparse").apply(torch.from_numpy(img)[None])[0].numpy()
    assert np.sqrt(np.mean((ours - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)) < 0.005


def test_float32_storage_adapts_to_float64_input():
    geo, g = ring(), grid()
    p32 = make_projector(geo, g, backend="sparse", cache_dir=False)
    assert p32.dtype == torch.float32
    x = rand_image(g)
    y = p32.apply(x)
    assert y.dtype == F64
    torch.testing.assert_close(y, proj(geo, g, "sparse").apply(x), rtol=1e-6, atol=1e-5)
    assert p32.apply(x.float()).dtype == torch.float32
    assert p32.adjointness_test() < 1e-10          # exact transpose even with float32 values
    assert p32.to("cpu") is p32


def test_autograd_backward_equals_adjoint():
    for backend in ("sparse", "matrix-free"):
        p = proj(ring(3), grid(3), backend)
        x = rand_image(grid(3)).requires_grad_(True)
        w = torch.randn(p.out_shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        (p(x) * w).sum().backward()
        torch.testing.assert_close(x.grad, p.adjoint(w))
    # and a Poisson log-likelihood gradient through attenuation + projector
    g = grid()
    p = proj(ring(), g, "sparse")
    a = SinogramScaling(attenuation_factors(p, torch.full(g.shape, 0.0096, dtype=F64)))
    op = a @ p
    x = (rand_image(g) + 0.5).requires_grad_(True)
    data = op.apply(x.detach()) * 1.3
    ybar = op(x)
    (ybar - data * torch.log(ybar + 1e-9)).sum().backward()
    torch.testing.assert_close(x.grad, op.adjoint(1 - data / (ybar.detach() + 1e-9)))


def test_attenuation_of_uniform_box():
    g = ImageGrid((1, 20, 16), (2.0, 2.5, 2.0))
    geo = ParallelBeamGeometry(1, 31, 2.0, angles=[0.0])
    p = proj(geo, g, "sparse")
    f = attenuation_factors(p, torch.full(g.shape, 0.01, dtype=F64))
    torch.testing.assert_close(f[0, 0, 15], torch.tensor(math.exp(-0.01 * 50.0), dtype=F64))
    assert float(f[0, 0, 0]) == 1.0      # a ray missing the object is not attenuated


# --- errors ------------------------------------------------------------------------------------------

def test_clear_errors():
    geo, g = ring(3), grid(3)
    p = proj(geo, g, "sparse")
    with pytest.raises(ValueError, match=r"expected input of shape \(\*batch, 3, 24, 20\); got \(2, 24, 20\)"):
        p.apply(torch.zeros(2, 24, 20, dtype=F64))
    with pytest.raises(ValueError, match=r"\(\*batch, 3, 36, 41\)"):
        p.adjoint(torch.zeros(3, 36, 40, dtype=F64))
    with pytest.raises(ValueError, match="3 plane.*2 slice"):
        make_projector(geo, grid(2), cache_dir=False)
    with pytest.raises(ValueError, match="larger than the transaxial field of view"):
        make_projector(ring(), ImageGrid((1, 40, 40), VOX), cache_dir=False)
    with pytest.raises(ValueError, match="matrix-free"):
        make_projector(ring(4, mrd=1), grid(4), backend="sparse", cache_dir=False)
    with pytest.raises(ValueError, match="unknown projector backend"):
        make_projector(geo, g, backend="fast", cache_dir=False)
    with pytest.raises(ValueError, match="duplicate"):
        p.subset([1, 1])
    with pytest.raises(ValueError, match=r"\[0, 35\]"):
        p.subset([36])
    with pytest.raises(ValueError, match="zero-length"):
        ListmodeProjector(np.zeros((2, 3)), np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), g)
    with pytest.raises(ValueError, match=r"\(n_events, 3\)"):
        ListmodeProjector(np.zeros((2, 2)), np.ones((2, 2)), g)


def test_parallelproj_backend_reports_unavailable():
    try:
        import parallelproj  # noqa: F401
    except Exception:
        with pytest.raises(BackendUnavailableError, match="conda-forge"):
            make_projector(ring(), grid(), backend="parallelproj")
        assert issubclass(BackendUnavailableError, ValueError)
    else:
        pytest.skip("parallelproj is installed; test_parallelproj_real covers it")


def test_parallelproj_real():
    pytest.importorskip("parallelproj", reason="parallelproj is conda-forge only and not installed here")
    geo, g = ring(3), grid(3)
    pp = make_projector(geo, g, backend="parallelproj")
    x = rand_image(g).float()
    torch.testing.assert_close(pp.apply(x), proj(geo, g, "matrix-free").apply(x.double()).float(),
                               rtol=1e-3, atol=1e-3)


def test_parallelproj_wrapper_plumbing(monkeypatch):
    """The wrapper's calls (argument order, axis order, origin, batching) against a stand-in module."""
    calls = []

    def fwd(xstart, xend, img, img_origin, voxsize):
        calls.append("fwd")
        g = ImageGrid(img.shape, tuple(voxsize), tuple(img_origin))
        c = matrix_free._GridConsts(g, "cpu")
        out = matrix_free.joseph_forward(torch.from_numpy(xstart).double(), torch.from_numpy(xend).double(), c,
                                         torch.from_numpy(img).double().reshape(1, -1))
        return out[0].float().numpy()

    def back(xstart, xend, img_shape, img_origin, voxsize, img_fwd):
        calls.append("back")
        g = ImageGrid(tuple(img_shape), tuple(voxsize), tuple(img_origin))
        c = matrix_free._GridConsts(g, "cpu")
        out = matrix_free.joseph_adjoint(torch.from_numpy(xstart).double(), torch.from_numpy(xend).double(), c,
                                         torch.from_numpy(img_fwd).double().reshape(1, -1))
        return out[0].reshape(img_shape).float().numpy()

    fake = types.ModuleType("parallelproj")
    fake.joseph3d_fwd, fake.joseph3d_back = fwd, back
    monkeypatch.setitem(sys.modules, "parallelproj", fake)
    g = ImageGrid((2, 24, 20), VOX, origin=(-1.5, -46.0, -47.5))
    geo = ring(2)
    pp = make_projector(geo, g, backend="parallelproj")
    assert isinstance(pp, ParallelprojProjector)
    x = rand_image(g, batch=(2,))
    ref = proj(geo, g, "matrix-free")
    torch.testing.assert_close(pp.apply(x), ref.apply(x), rtol=1e-5, atol=1e-4)
    y = ref.apply(x)
    torch.testing.assert_close(pp.adjoint(y), ref.adjoint(y), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pp.subset([4, 2]).apply(x), ref.apply(x)[:, :, [4, 2]], rtol=1e-5, atol=1e-4)
    assert calls.count("fwd") == 4 and calls.count("back") == 2


# --- disk cache --------------------------------------------------------------------------------------

def _build(geo, g, cache_dir):
    sparse_joseph.clear_memory_cache()
    return make_projector(geo, g, backend="sparse", cache_dir=cache_dir)


def test_cache_round_trip_and_env_override(tmp_path, monkeypatch):
    geo, g = ring(), grid()
    p1 = _build(geo, g, tmp_path)
    assert p1.info["source"] == "built" and p1.info["nnz"] > 0
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    p2 = _build(geo, g, tmp_path)
    assert p2.info["source"] == "disk cache"
    x = rand_image(g).float()
    torch.testing.assert_close(p1.apply(x), p2.apply(x), rtol=0, atol=0)
    monkeypatch.setenv("NAPARI_PETDIFF_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "projectors"
    _build(geo, g, None)
    assert len(list((tmp_path / "env" / "projectors").glob("*.npz"))) == 1
    # a different grid is a different matrix
    _build(geo, ImageGrid((1, 24, 20), (3.0, 4.0, 4.5)), tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "tamper"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage):
    geo, g = ring(), grid()
    ref = _build(geo, g, tmp_path)
    x = rand_image(g).float()
    expected = ref.apply(x)
    path = next(tmp_path.glob("*.npz"))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        mid = len(raw) // 2
        raw[mid:mid + 64] = bytes(255 - b for b in raw[mid:mid + 64])
    elif damage == "garbage":
        raw = bytearray(b"not a zip file at all" * 10)
    if damage == "tamper":
        # a well-formed file whose column indices point outside the image (would crash SpMM)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k].copy() for k in f.files}
        arrays["a_indices"][0] = 10 ** 6
        np.savez(path, **arrays)
    else:
        path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        p = _build(geo, g, tmp_path)
    assert p.info["source"] == "built"
    torch.testing.assert_close(p.apply(x), expected, rtol=0, atol=0)
    assert _build(geo, g, tmp_path).info["source"] == "disk cache"
