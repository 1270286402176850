import json
import math

import numpy as np
import pytest
import torch

from napari_petdiff.engine.geometry import (Geometry, ParallelBeamGeometry, RingScannerGeometry,
                                            brain_scanner)
from napari_petdiff.engine.grid import ImageGrid


def small_ring(**kw):
    args = dict(radius_mm=80.0, n_sides=12, endpoints_per_side=6, endpoint_spacing_mm=7.0, radial_trim=20)
    args.update(kw)
    return RingScannerGeometry(**args)


# --- shapes and conventions ------------------------------------------------------------------

def test_parallel_beam_shapes_and_default_angles():
    g = ParallelBeamGeometry(30, 21, 2.0, n_planes=3)
    assert g.sinogram_shape == (3, 30, 21)
    assert (g.n_planes, g.n_views, g.n_radial) == (3, 30, 21)
    assert g.is_planar
    np.testing.assert_allclose(g.angles, np.arange(30) * np.pi / 30)
    np.testing.assert_allclose(g.plane_z_mm, [-2.0, 0.0, 2.0])
    xs, xe = g.lor_endpoints()
    assert xs.dtype == torch.float64 and xs.shape == (3, 30, 21, 3) and xe.shape == xs.shape
    np.testing.assert_allclose(xs[1, ..., 0], 0.0)
    np.testing.assert_allclose(xe[2, ..., 0], 2.0)


def test_parallel_beam_angle_and_radial_convention():
    g = ParallelBeamGeometry(2, 5, 3.0, angles=[0.0, np.pi / 2])
    xs, xe = (t.numpy()[0] for t in g.lor_endpoints())
    t = (np.arange(5) - 2) * 3.0
    # theta = 0: rays along y, radial coordinate t = x
    d0 = xe[0] - xs[0]
    np.testing.assert_allclose(d0[:, 2], 0.0, atol=1e-9)
    assert np.all(d0[:, 1] > 0)
    np.testing.assert_allclose(xs[0, :, 2], t, atol=1e-9)
    # theta = pi/2: rays along +x, radial coordinate t = -y
    d1 = xe[1] - xs[1]
    np.testing.assert_allclose(d1[:, 1], 0.0, atol=1e-9)
    assert np.all(d1[:, 2] > 0)
    np.testing.assert_allclose(xs[1, :, 1], -t, atol=1e-9)


def test_parallel_beam_radial_offset_and_centre():
    g = ParallelBeamGeometry(1, 3, 2.0, angles=[0.0], centre_mm=(1.0, -4.0), radial_offset_mm=0.5)
    xs, _ = g.lor_endpoints()
    np.testing.assert_allclose(xs[0, 0, :, 2].numpy(), -4.0 + 0.5 + np.array([-2.0, 0.0, 2.0]))


def test_ring_endpoints_lie_on_polygon_and_views_are_parallel():
    g = small_ring()
    n = g.n_endpoints_per_ring
    assert g.sinogram_shape == (1, n // 2, n + 1 - 2 * g.radial_trim)
    ends = g._endpoints_yx
    phi = 2 * np.pi * (np.arange(n) // g.endpoints_per_side) / g.n_sides
    normal_dist = ends[:, 1] * np.cos(phi) + ends[:, 0] * np.sin(phi)
    np.testing.assert_allclose(normal_dist, g.radius_mm)
    s, e = g.inplane_endpoints()
    dirs = (e - s) / np.linalg.norm(e - s, axis=-1, keepdims=True)
    m = g.endpoints_per_side
    for v in (0, 7, g.n_views - 1):
        mu = 2 * np.pi * (v - (m - 1) / 2) / n
        nrm = np.array([np.sin(mu), np.cos(mu)])
        # all LORs of a view are perpendicular to its normal up to the half-step interleave
        assert np.abs(dirs[v] @ nrm).max() < math.sin(1.5 * np.pi / n)
        signed = ((s[v] + e[v]) / 2) @ nrm
        assert np.all(np.diff(signed) > 0), "radial index must increase with signed distance"
        assert abs(signed[(g.n_radial - 1) // 2]) < 1e-9, "centre bin passes through the axis"


def test_ring_plane_order_span1():
    g = small_ring(n_rings=4, max_ring_difference=2, ring_spacing_mm=3.0)
    start, end = g.plane_rings()
    expected_end = [0, 1, 2, 3] + [1, 2, 3] + [0, 1, 2] + [2, 3] + [0, 1]
    expected_start = [0, 1, 2, 3] + [0, 1, 2] + [1, 2, 3] + [0, 1] + [2, 3]
    assert start.tolist() == expected_start and end.tolist() == expected_end
    assert g.n_planes == 4 + 2 * (3 + 2)
    assert not g.is_planar
    xs, xe = g.lor_endpoints(views=[0, 5])
    z = g.ring_z_mm()
    np.testing.assert_allclose(z, [-4.5, -1.5, 1.5, 4.5])
    np.testing.assert_allclose(xs[:, 0, 0, 0].numpy(), z[expected_start])
    np.testing.assert_allclose(xe[:, 1, 3, 0].numpy(), z[expected_end])


def test_lor_endpoints_view_selection_keeps_order():
    g = small_ring(n_rings=2)
    xs, xe = g.lor_endpoints()
    sel = [9, 2, 4]
    ys, ye = g.lor_endpoints(views=torch.tensor(sel))
    torch.testing.assert_close(ys, xs[:, sel])
    torch.testing.assert_close(ye, xe[:, sel])
    with pytest.raises(ValueError, match="view indices"):
        g.lor_endpoints(views=[g.n_views])
    with pytest.raises(ValueError, match="duplicate"):
        g.lor_endpoints(views=[1, 1])


def test_view_subsets():
    g = ParallelBeamGeometry(10, 5, 1.0)
    subs = g.view_subsets(3)
    assert [s.tolist() for s in subs] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert all(s.dtype == torch.long for s in subs)
    assert sorted(torch.cat(subs).tolist()) == list(range(10))
    assert len(g.view_subsets(10)) == 10
    for bad in (0, 11, -1):
        with pytest.raises(ValueError, match="n_subsets"):
            g.view_subsets(bad)
    with pytest.raises(ValueError, match="integer"):
        g.view_subsets(2.5)


# --- serialisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("geo", [
    ParallelBeamGeometry(12, 9, 1.5, n_planes=2, plane_spacing_mm=3.0, centre_mm=(0.5, 0.5), radial_offset_mm=-0.5),
    ParallelBeamGeometry(4, 7, 2.0, angles=[0.1, 0.5, 1.0, 3.0], plane_z_mm=[7.0]),
    small_ring(n_rings=3, max_ring_difference=1),
    brain_scanner(n_rings=64),
])
def test_to_dict_from_dict_round_trip(geo):
    d = json.loads(json.dumps(geo.to_dict()))
    back = Geometry.from_dict(d)
    assert type(back) is type(geo)
    assert back == geo
    for a, b in zip(back.lor_endpoints(views=[0, 1]), geo.lor_endpoints(views=[0, 1])):
        torch.testing.assert_close(a, b)
    assert back.describe() == geo.describe()


def test_from_dict_errors():
    with pytest.raises(ValueError, match="unknown geometry kind"):
        Geometry.from_dict({"kind": "spiral"})
    with pytest.raises(ValueError, match="kind"):
        Geometry.from_dict({"n_views": 3})
    with pytest.raises(ValueError, match="radial_spacing_mm"):
        Geometry.from_dict({"kind": "parallel-beam", "n_views": 3, "n_radial": 4})
    d = small_ring().to_dict()
    d["radius"] = 3
    with pytest.raises(ValueError, match="unknown key"):
        Geometry.from_dict(d)


def test_constructor_validation():
    with pytest.raises(ValueError, match="even"):
        RingScannerGeometry(80.0, 5, 3, 5.0)
    with pytest.raises(ValueError, match="do not fit"):
        RingScannerGeometry(80.0, 12, 6, 8.0)
    with pytest.raises(ValueError, match="max_ring_difference"):
        small_ring(n_rings=2, max_ring_difference=2)
    with pytest.raises(ValueError, match="n_views"):
        ParallelBeamGeometry(0, 5, 1.0)
    with pytest.raises(ValueError, match="angles"):
        ParallelBeamGeometry(3, 5, 1.0, angles=[0.0, 1.0])


def test_describe_mentions_shape():
    assert str(brain_scanner(2).sinogram_shape) in brain_scanner(2).describe()
    assert "parallel-beam" in ParallelBeamGeometry(3, 5, 1.0).describe()


# --- fit with the image grid ------------------------------------------------------------------

def test_brain_scanner_preset_fits_128_at_2mm():
    g = brain_scanner()
    assert 2 * g.fov_radius_mm > 256 * 1.3
    assert g.radial_spacing_estimate_mm < 2.2
    assert g.n_views >= 180
    g.check_grid(ImageGrid((1, 128, 128), (2.0, 2.0, 2.0)))
    g64 = brain_scanner(n_rings=64)
    g64.check_grid(ImageGrid((64, 128, 128), (2.0, 2.0, 2.0)))
    np.testing.assert_allclose(g64.plane_z_endpoints()[0], ImageGrid((64, 128, 128)).voxel_centres(0))
    brain_scanner(n_rings=8, max_ring_difference=3).check_grid(ImageGrid((8, 128, 128), (2.0, 2.0, 2.0)))


def test_check_grid_errors():
    g = brain_scanner(n_rings=4)
    with pytest.raises(ValueError, match="4 plane.*2 slice"):
        g.check_grid(ImageGrid((2, 128, 128)))
    shifted = ImageGrid((4, 128, 128), origin=(-2.0, -127.0, -127.0))
    with pytest.raises(ValueError, match="slice centres"):
        g.check_grid(shifted)
    with pytest.raises(ValueError, match="larger than the transaxial field of view"):
        g.check_grid(ImageGrid((4, 200, 200)))
    with pytest.raises(ValueError, match="slice thickness"):
        g.check_grid(ImageGrid((4, 128, 128), (3.0, 2.0, 2.0)))
    with pytest.raises(ValueError, match="ImageGrid"):
        g.check_grid((4, 128, 128))
    # 2-D parallel beam at z = 0 vs a slice at z = 5 mm
    p = ParallelBeamGeometry(10, 40, 2.0)
    with pytest.raises(ValueError, match="plane_z_mm"):
        p.check_grid(ImageGrid((1, 32, 32), origin=(5.0, -31.0, -31.0)))
    ParallelBeamGeometry(10, 40, 2.0, plane_z_mm=[5.0]).check_grid(ImageGrid((1, 32, 32), origin=(5.0, -31.0, -31.0)))
    # oblique 3-D: slices outside the axial FOV
    g3 = small_ring(n_rings=3, max_ring_difference=1, ring_spacing_mm=2.0)
    g3.check_grid(ImageGrid((3, 16, 16), (2.0, 4.0, 4.0)))
    with pytest.raises(ValueError, match="axial"):
        g3.check_grid(ImageGrid((6, 16, 16), (2.0, 4.0, 4.0)))


def test_check_grid_image_beyond_detectors():
    g = ParallelBeamGeometry(10, 400, 1.0)  # huge FOV, but the ring of endpoints is what matters for a ring
    g.check_grid(ImageGrid((1, 100, 100), (1.0, 1.0, 1.0)))
    ring = RingScannerGeometry(60.0, 12, 6, 5.0, radial_trim=1)
    ring.check_grid(ImageGrid((1, 40, 40), (1.0, 2.0, 2.0)))
    with pytest.raises(ValueError, match="detector ring"):
        ring.check_grid(ImageGrid((1, 50, 50), (1.0, 2.0, 2.0)))
