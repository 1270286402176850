"""Phantoms: MNI152 brain (FDG / amyloid-like), lesions, deformations, template cache, Shepp-Logan."""
import json

import numpy as np
import pytest
import torch

from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.phantoms import (
    MU_BONE, MU_SOFT_TISSUE, DeformationField, Lesion, Phantom, brain_phantom, deform, default_lesions,
    random_deformation_field, random_training_volume, shepp_logan, template_volumes,
)
from napari_petdiff.engine.phantoms import templates as tmpl
from napari_petdiff.engine.phantoms.brain import phantom_grid

# small grids: 64 x 64 at 4 mm still holds the whole head (256 mm)
SMALL2D = dict(dims=2, shape=(1, 64, 64), voxel_size_mm=4.0)
SMALL3D = dict(dims=3, shape=(32, 64, 64), voxel_size_mm=4.0)


@pytest.fixture(scope="module")
def fdg2d():
    """The default 2-D slice (2 mm): thin cortex has pure-GM voxels only at this resolution."""
    return brain_phantom(lesions=default_lesions())


@pytest.fixture(scope="module")
def fdg3d():
    return brain_phantom(**SMALL3D)


def test_default_shapes_and_grid():
    assert phantom_grid(3, None, 2.0, 0.0).shape == (64, 128, 128)
    g = phantom_grid(2, None, 2.0, 12.0)
    assert g.shape == (1, 128, 128) and g.origin[0] == 12.0
    assert np.allclose(phantom_grid(3, None, 2.0, 0.0).origin, (-63.0, -127.0, -127.0))


def test_brain_2d_arrays(fdg2d):
    p = fdg2d
    assert isinstance(p, Phantom) and p.grid.shape == (1, 128, 128)
    for name in ("activity", "mu", "mr", "gm", "wm", "csf"):
        a = getattr(p, name)
        assert a.shape == (1, 128, 128) and a.dtype == np.float32, name
        assert np.all(np.isfinite(a)) and a.min() >= 0, name
    assert p.brain_mask.dtype == bool and 0.1 < p.brain_mask.mean() < 0.6
    for name in ("gm", "wm", "csf", "mr"):
        assert getattr(p, name).max() <= 1.0 + 1e-6, name
    assert (p.gm + p.wm + p.csf).max() <= 1.0 + 1e-5
    assert p.activity.max() == pytest.approx(6.0)  # the hot lesion: 1.5 x GM (4)
    assert p.mu.max() == pytest.approx(MU_BONE, rel=1e-4)
    info = json.loads(json.dumps(p.info))
    assert info["tracer"] == "fdg" and info["gm_wm_ratio"] == 4.0 and len(info["lesions"]) == 2


@pytest.mark.parametrize("ratio", [4.0, 2.5])
def test_gm_wm_ratio(ratio):
    p = brain_phantom(gm_wm_ratio=ratio)
    # activity is exactly ratio x GM + 1 x WM + 0.05 x CSF fraction
    coef, *_ = np.linalg.lstsq(np.stack([p.gm.ravel(), p.wm.ravel(), p.csf.ravel()], 1), p.activity.ravel(),
                               rcond=None)
    assert coef == pytest.approx([ratio, 1.0, 0.05], abs=1e-4)
    pure_gm, pure_wm = p.gm > 0.95, p.wm > 0.95
    assert pure_gm.sum() > 20 and pure_wm.sum() > 200
    # in (near-)pure voxels the other tissues make up at most 5 %
    assert np.all(np.abs(p.activity[pure_gm] - ratio) <= 0.05 * ratio + 1e-5)
    assert np.all(np.abs(p.activity[pure_wm] - 1.0) <= 0.05 * max(ratio, 1.0) + 1e-5)


def test_amyloid_has_wm_above_gm():
    p = brain_phantom(tracer="amyloid", **SMALL2D)
    assert p.info["gm_wm_ratio"] == pytest.approx(0.6)
    assert p.activity[p.wm > 0.9].mean() > 1.4 * p.activity[p.gm > 0.8].mean()
    fdg = brain_phantom(**SMALL2D)
    assert fdg.activity[fdg.wm > 0.9].mean() < 0.5 * fdg.activity[fdg.gm > 0.8].mean()


def test_default_lesions(fdg2d):
    p = fdg2d
    hot, cold = default_lesions()
    assert len(p.lesion_masks) == 2
    for m in p.lesion_masks:
        assert m.dtype == bool and m.shape == p.activity.shape and m.sum() >= 10
        assert not np.any(m & ~p.brain_mask)
    hm, cm = p.lesion_masks
    assert np.allclose(p.activity[hm], 1.5 * 4.0) and np.allclose(p.activity[cm], 0.5 * 1.0)
    assert p.gm[hm].mean() > 0.5 and p.wm[cm].mean() > 0.8  # hot in grey, cold in white matter
    # a 2-D sphere section: radius 5 mm at 2 mm pixels covers about pi 25 / 4 pixels
    assert abs(hm.sum() - np.pi * hot.radius_mm**2 / 4.0) < 6
    assert len(default_lesions(3)) == 3


def test_lesion_references():
    base = brain_phantom(**SMALL2D)
    les = [Lesion((0, 1, -39), 8.0, 2.0, "local"), Lesion((0, 45, 25), 8.0, 3.3, "absolute")]
    p = brain_phantom(lesions=les, **SMALL2D)
    local, absolute = p.lesion_masks
    assert np.allclose(p.activity[local], 2.0 * base.activity[local])
    assert np.allclose(p.activity[absolute], 3.3)
    outside = ~(local | absolute)
    assert np.array_equal(p.activity[outside], base.activity[outside])
    assert np.array_equal(p.mr, base.mr)  # lesions are PET-only


def test_lesion_errors():
    with pytest.raises(ValueError, match="no brain voxel"):
        brain_phantom(lesions=[Lesion((0, 0, 120), 5, 1.5)], **SMALL2D)
    with pytest.raises(ValueError, match="slice_z_mm"):
        brain_phantom(lesions=default_lesions(), slice_z_mm=40.0, **SMALL2D)
    with pytest.raises(ValueError, match="radius"):
        Lesion((0, 0, 0), 0.0, 1.5)
    with pytest.raises(ValueError, match="reference"):
        Lesion((0, 0, 0), 3.0, 1.5, "csf")
    with pytest.raises(ValueError, match="Lesion"):
        brain_phantom(lesions=[((0, 0, 0), 5, 1.5)], **SMALL2D)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dims"):
        brain_phantom(dims=4)
    with pytest.raises(ValueError, match="does not fit"):
        brain_phantom(dims=2, shape=(8, 64, 64))
    with pytest.raises(ValueError, match="tracer"):
        brain_phantom(tracer="fdopa", **SMALL2D)
    with pytest.raises(ValueError, match="gm_wm_ratio"):
        brain_phantom(gm_wm_ratio=-1.0, **SMALL2D)
    with pytest.raises(ValueError, match="strength_mm"):
        random_deformation_field((1, 8, 8), -1.0, 4.0, 0)


def test_skull_and_field_of_view(fdg2d, fdg3d):
    for p in (fdg2d, fdg3d):
        skull = p.mu > 0.5 * (MU_SOFT_TISSUE + MU_BONE)
        assert not np.any(skull & p.brain_mask)
        # brain is soft tissue (bone partial volume only in a few edge voxels)
        assert np.mean(np.isclose(p.mu[p.brain_mask], MU_SOFT_TISSUE)) > 0.97
        # the whole head fits in plane: air along every border row and column
        for border in (p.mu[:, 0], p.mu[:, -1], p.mu[:, :, 0], p.mu[:, :, -1]):
            assert border.max() == 0.0
    # a closed shell: every ray from the centre of the 2-D slice crosses bone, then scalp, then air
    mu = fdg2d.mu[0]
    c = 64
    for ray in (mu[c, c:], mu[c, c::-1], mu[c:, c], mu[c::-1, c], np.diag(mu[c:, c:])):
        bone = np.flatnonzero(ray > 0.014)
        assert bone.size >= 2 and np.all(np.diff(bone) == 1)  # one band, 4-12 mm along the ray
        assert bone.size <= 6
        outside = ray[bone[-1] + 1:]
        assert np.any(np.isclose(outside, MU_SOFT_TISSUE, rtol=1e-3)) and outside[-1] == 0.0


def test_mr_tissue_order(fdg2d):
    for p in (fdg2d, brain_phantom(deformation_seed=11)):
        inside = p.brain_mask
        wm, gm, csf = (p.mr[(f > 0.9) & inside].mean() for f in (p.wm, p.gm, p.csf))
        assert wm > gm + 0.1 and gm > csf + 0.2
    p = fdg2d
    # MR follows the same anatomy as the activity (no lesions): strongly correlated inside the brain
    assert np.corrcoef(p.mr[p.brain_mask], (p.wm - p.csf)[p.brain_mask])[0, 1] > 0.8


def test_deformation_reproducible_and_seed_dependent():
    a = brain_phantom(deformation_seed=7, **SMALL2D)
    b = brain_phantom(deformation_seed=7, **SMALL2D)
    c = brain_phantom(deformation_seed=8, **SMALL2D)
    base = brain_phantom(**SMALL2D)
    for name in ("activity", "mu", "mr", "gm"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.abs(a.activity - c.activity).mean() > 0.05
    assert np.abs(a.activity - base.activity).mean() > 0.05
    assert a.info["deformation"]["seed"] == 7 and a.info["deformation_seed"] == 7
    # the deformation moves tissue but keeps the totals roughly (small affine scale)
    assert a.gm.sum() == pytest.approx(base.gm.sum(), rel=0.25)


def test_zero_strength_is_identity():
    f = random_deformation_field((4, 16, 16), 0.0, 4.0, seed=3)
    assert isinstance(f, DeformationField) and f.is_identity
    vol = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    assert np.array_equal(deform(vol, f), vol)
    p0 = brain_phantom(deformation_seed=5, deformation_strength_mm=0.0, **SMALL2D)
    base = brain_phantom(**SMALL2D)
    assert np.allclose(p0.activity, base.activity, atol=1e-4) and np.allclose(p0.mu, base.mu, atol=1e-7)


def test_zero_field_from_a_larger_source_is_the_crop():
    # exercises the grid_sample path: the field's grid is the centre of a bigger source grid
    src = ImageGrid((6, 10, 12), (2.0, 3.0, 4.0))
    vol = np.random.default_rng(1).random(src.shape).astype(np.float32)
    g = ImageGrid((2, 4, 6), (2.0, 3.0, 4.0), (src.origin[0] + 4.0, src.origin[1] + 9.0, src.origin[2] + 12.0))
    f = random_deformation_field(g.shape, 0.0, g.voxel_size, 0, origin=g.origin)
    out = deform(vol, f, src)
    assert np.allclose(out, vol[2:4, 3:7, 3:9], atol=1e-5)


def test_deform_sign_convention():
    # output voxel p samples the source at p + displacement: +1 voxel in x shifts the image left
    g = ImageGrid((3, 8, 8), (2.0, 2.0, 2.0))
    vol = np.random.default_rng(2).random(g.shape).astype(np.float32)
    disp = np.zeros(g.shape + (3,), np.float32)
    disp[..., 2] = 2.0
    out = deform(vol, DeformationField(disp, g, {}))
    assert np.allclose(out[:, :, :-1], vol[:, :, 1:], atol=1e-5) and np.all(out[:, :, -1] == 0)


def test_deform_containers_and_errors():
    f = random_deformation_field((4, 16, 16), 3.0, 4.0, seed=1)
    vol = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    out = deform({"a": vol, "m": vol > 0.5, "t": torch.from_numpy(vol)}, f)
    assert out["a"].dtype == np.float32 and out["m"].dtype == bool and isinstance(out["t"], torch.Tensor)
    assert np.allclose(out["t"].numpy(), out["a"]) and not np.allclose(out["a"], vol)
    stacked = deform(np.stack([vol, 2 * vol]), f)
    assert stacked.shape == (2, 4, 16, 16) and np.allclose(stacked[1], 2 * out["a"], atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        deform(vol[:, :8], f)
    with pytest.raises(ValueError, match="DeformationField"):
        deform(vol, np.zeros((4, 16, 16, 3)))


def test_field_strength_and_affine():
    f = random_deformation_field((16, 32, 32), 4.0, 4.0, seed=1, affine_jitter=False)
    rms = np.sqrt(np.mean(f.displacement_mm**2, axis=(0, 1, 2)))
    assert np.all((rms > 2.0) & (rms < 6.0))
    g = random_deformation_field((16, 32, 32), 4.0, 4.0, seed=1)
    assert not np.allclose(f.displacement_mm, g.displacement_mm)
    assert abs(g.params["rotation_deg_zyx"][0]) <= 5.0 and all(0.9 < s < 1.1 for s in g.params["scale_zyx"])
    assert f.params["scale_zyx"] == [1.0, 1.0, 1.0]


def test_2d_slice_matches_3d_plane(fdg3d):
    # one world frame: a 2-D slice equals the 3-D volume's plane at the same z, deformed or not
    k = 16
    z = fdg3d.grid.voxel_centres(0)[k]
    p2 = brain_phantom(slice_z_mm=z, **SMALL2D)
    assert np.allclose(p2.activity[0], fdg3d.activity[k], atol=1e-3)
    assert np.allclose(p2.mu[0], fdg3d.mu[k], atol=1e-6)
    d3 = brain_phantom(deformation_seed=4, **SMALL3D)
    d2 = brain_phantom(slice_z_mm=z, deformation_seed=4, **SMALL2D)
    assert np.allclose(d2.activity[0], d3.activity[k], atol=1e-3)


def test_template_volumes_real_data(fdg3d):
    v = template_volumes(4.0, (32, 64, 64))
    assert {"gm", "wm", "csf", "t1", "brain_mask", "brain_distance_mm"} <= set(v)
    assert all(a.shape == (32, 64, 64) for a in v.values()) and v["brain_mask"].dtype == bool
    assert np.array_equal(v["gm"], fdg3d.gm) and np.array_equal(v["brain_mask"], fdg3d.brain_mask)
    t1 = v["t1"][v["brain_mask"]]
    assert 0.0 <= t1.min() and t1.max() <= 1.0 and v["t1"][~v["brain_mask"]].max() < 0.5


@pytest.fixture
def fake_resampler(tmp_path, monkeypatch):
    """An empty cache in tmp_path and a cheap stand-in for the MNI resampling that counts its calls."""
    monkeypatch.setenv("NAPARI_PETDIFF_CACHE", str(tmp_path))
    tmpl.clear_memory_cache()
    calls = []

    def resample(grid):
        calls.append(grid)
        rng = np.random.default_rng(len(calls))
        return {k: rng.random(grid.shape, dtype=np.float32) for k in tmpl.CHANNELS}

    monkeypatch.setattr(tmpl, "_resample", resample)
    yield calls
    tmpl.clear_memory_cache()


def test_template_cache_memory_and_disk(fake_resampler, tmp_path, monkeypatch):
    assert tmpl.cache_dir() == tmp_path / "phantoms"
    shape = (1, 32, 32)
    v = template_volumes(8.0, shape)
    assert len(fake_resampler) == 1 and v["brain_mask"].dtype == bool
    files = list((tmp_path / "phantoms").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as f:
        assert set(f.files) == set(tmpl.CHANNELS)
    tmpl.clear_memory_cache()
    w = template_volumes(8.0, shape)  # from disk
    assert len(fake_resampler) == 1 and all(np.array_equal(v[k], w[k]) for k in v)
    template_volumes(8.0, (1, 16, 16))  # another grid is another entry
    assert len(fake_resampler) == 2
    monkeypatch.setattr(tmpl, "_load_npz", lambda *a: pytest.fail("the memory cache should have been used"))
    x = template_volumes(8.0, shape)  # from memory
    assert len(fake_resampler) == 2 and np.array_equal(x["gm"], v["gm"])
    x["gm"][:] = -1  # callers get copies: the cache is not modified
    assert template_volumes(8.0, shape)["gm"].min() >= 0


def test_damaged_cache_file_is_rebuilt(fake_resampler, tmp_path):
    grid = tmpl.source_grid(tmpl.centred_grid((1, 32, 32), 8.0))
    path = tmpl.cache_path(grid)
    assert path.parent == tmp_path / "phantoms"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    stale = path.parent / "mni152-2009-v0_0123456789abcdef.npz"  # an older cache version
    stale.write_bytes(b"old")
    template_volumes(8.0, (1, 32, 32))
    assert len(fake_resampler) == 1 and not stale.exists()
    with np.load(path, allow_pickle=False) as f:
        assert f["gm"].shape == grid.shape


def test_random_training_volume():
    shape = (16, 64, 64)
    a = random_training_volume(np.random.default_rng(3), shape=shape, voxel_size_mm=4.0)
    b = random_training_volume(np.random.default_rng(3), shape=shape, voxel_size_mm=4.0)
    c = random_training_volume(np.random.default_rng(4), shape=shape, voxel_size_mm=4.0)
    assert a.shape == shape and a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    rng = np.random.default_rng(0)
    shape = (8, 64, 64)
    plain = [random_training_volume(rng, shape, 4.0, gm_wm_range=(3.0, 3.0), lesion_prob=0.0) for _ in range(2)]
    assert all(0.0 <= v.min() and v.max() <= 3.0 + 1e-4 for v in plain)
    assert all(v.max() > 2.0 for v in plain)  # grey matter reached
    with_lesions = [random_training_volume(rng, shape, 4.0, gm_wm_range=(3.0, 3.0), lesion_prob=1.0)
                    for _ in range(4)]
    assert any(v.max() > 3.0 * 1.3 - 1e-3 for v in with_lesions)  # some hot lesion
    s = random_training_volume(rng, shape=(1, 64, 64), voxel_size_mm=4.0)
    assert s.shape == (1, 64, 64) and s.max() > 1.0
    with pytest.raises(ValueError, match="Generator"):
        random_training_volume(0)
    with pytest.raises(ValueError, match="gm_wm_range"):
        random_training_volume(rng, shape, 4.0, gm_wm_range=(5.0, 2.0))


def test_shepp_logan():
    p = shepp_logan()
    assert p.activity.shape == (1, 128, 128) and p.activity.dtype == np.float32
    assert p.activity.min() >= 0 and p.activity.max() == pytest.approx(1.0)
    head = p.mu > 0
    assert p.mu.max() == pytest.approx(MU_SOFT_TISSUE) and np.allclose(p.mu[p.brain_mask], MU_SOFT_TISSUE)
    assert p.mu[0, 0, 0] == 0 and head[0, 64, 64]
    assert p.brain_mask.sum() > 0.5 * head.sum()
    assert (p.gm + p.wm + p.csf).max() <= 1.0 + 1e-6
    assert p.csf[p.brain_mask].mean() > 0.02  # the two ventricles
    q = shepp_logan(3, shape=(16, 32, 32))
    assert q.activity.shape == (16, 32, 32)
    assert np.abs(q.activity[7:9].mean(0) - shepp_logan(2, shape=(1, 32, 32)).activity[0]).mean() < 0.02
    with pytest.raises(ValueError, match="dims"):
        shepp_logan(5)


def test_shepp_logan_matches_skimage():
    skdata = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    ref = resize(skdata.shepp_logan_phantom(), (128, 128), anti_aliasing=True)
    ours = shepp_logan().activity[0]
    assert np.corrcoef(ref.ravel(), ours.ravel())[0, 1] > 0.98
    assert np.abs(ref - ours).mean() < 0.02
