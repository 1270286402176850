import numpy as np
import pytest
import torch

from napari_petdiff.engine.acquisition import Acquisition, AcquisitionError, FrameTiming
from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.io import (FileFormatError, load_acquisition, load_acquisition_images, read_nifti,
                                      save_acquisition, write_nifti)


def _acq(small_setup, **kw):
    grid, geom = small_setup
    y = torch.ones(geom.sinogram_shape)
    args = dict(prompts=y, geometry=geom, grid=grid)
    args.update(kw)
    return Acquisition(**args)


def test_valid_acquisition(small_setup):
    a = _acq(small_setup)
    assert "static PET acquisition" in a.describe()
    assert a.total_counts == pytest.approx(float(np.prod(small_setup[1].sinogram_shape)))


@pytest.mark.parametrize("bad,match", [
    (lambda s: torch.ones(3, 4, 5), "expects"),
    (lambda s: -torch.ones(s), "negative"),
    (lambda s: torch.full(s, float("nan")), "NaN"),
    (lambda s: torch.zeros(s), "all zero"),
])
def test_bad_prompts(small_setup, bad, match):
    with pytest.raises(AcquisitionError, match=match):
        _acq(small_setup, prompts=bad(small_setup[1].sinogram_shape))


def test_bad_factors(small_setup):
    s = small_setup[1].sinogram_shape
    with pytest.raises(AcquisitionError, match="multiplicative"):
        _acq(small_setup, multiplicative=torch.zeros(s))
    with pytest.raises(AcquisitionError, match="additive"):
        _acq(small_setup, additive=torch.ones(2, 2))
    with pytest.raises(AcquisitionError, match="psf"):
        _acq(small_setup, psf_fwhm_mm=(-1, 0, 0))


def test_frame_timing_errors():
    FrameTiming([0, 10], [10, 20])
    with pytest.raises(AcquisitionError, match="overlap"):
        FrameTiming([0, 5], [10, 20])
    with pytest.raises(AcquisitionError, match="sorted"):
        FrameTiming([10, 0], [20, 5])
    with pytest.raises(AcquisitionError, match="before it starts"):
        FrameTiming([0], [0])


def test_dynamic_frame_count_mismatch(small_setup):
    grid, geom = small_setup
    with pytest.raises(AcquisitionError, match="frames"):
        Acquisition(torch.ones(3, *geom.sinogram_shape), geom, grid, frames=FrameTiming([0, 10], [10, 20]))


def test_save_load_round_trip(tmp_path, small_acq):
    acq = small_acq.acquisition
    p = save_acquisition(tmp_path / "a.petacq", acq, {"truth": small_acq.truth})
    b = load_acquisition(p)
    torch.testing.assert_close(b.prompts, acq.prompts)
    torch.testing.assert_close(b.multiplicative, acq.multiplicative)
    torch.testing.assert_close(b.additive, acq.additive)
    assert b.grid == acq.grid
    assert b.geometry.to_dict() == acq.geometry.to_dict()
    assert b.metadata["truth_scale"] == pytest.approx(acq.metadata["truth_scale"])
    torch.testing.assert_close(load_acquisition_images(p)["truth"], small_acq.truth)


def test_corrupt_and_truncated_files(tmp_path, small_acq):
    p = save_acquisition(tmp_path / "a.petacq", small_acq.acquisition)
    raw = p.read_bytes()
    (tmp_path / "trunc.petacq").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FileFormatError, match="corrupt or truncated"):
        load_acquisition(tmp_path / "trunc.petacq")
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    (tmp_path / "flip.petacq").write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match="checksum"):
        load_acquisition(tmp_path / "flip.petacq")
    (tmp_path / "junk.petacq").write_bytes(b"not a file at all")
    with pytest.raises(FileFormatError):
        load_acquisition(tmp_path / "junk.petacq")
    with pytest.raises(FileNotFoundError):
        load_acquisition(tmp_path / "missing.petacq")


def test_nifti_round_trip_keeps_affine(tmp_path):
    grid = ImageGrid((4, 6, 5), (3.0, 2.0, 1.5), (-10.0, 5.0, 7.5))
    img = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    write_nifti(tmp_path / "x.nii.gz", img, grid)
    back, g2 = read_nifti(tmp_path / "x.nii.gz")
    assert g2 == grid
    np.testing.assert_array_equal(back, img)
    import nibabel as nib
    aff = nib.load(str(tmp_path / "x.nii.gz")).affine
    # voxel (i=x, j=y, k=z) = (1, 2, 3) sits at world x = 7.5 + 1.5, y = 5 + 4, z = -10 + 9
    np.testing.assert_allclose(aff @ [1, 2, 3, 1], [9.0, 9.0, -1.0, 1.0])
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    with pytest.raises(FileFormatError):
        read_nifti(tmp_path / "bad.nii.gz")


def test_grid_validation_and_napari_mapping():
    g = ImageGrid((1, 4, 4), (2.0, 2.0, 2.0))
    assert g.origin == (0.0, -3.0, -3.0)
    assert g.napari_scale() == (2.0, 2.0, 2.0) and g.napari_translate() == g.origin
    with pytest.raises(ValueError, match="positive"):
        ImageGrid((1, 4, 4), (0.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="three"):
        ImageGrid((4, 4))
    rot = np.eye(4); rot[:2, :2] = [[0, -1], [1, 0]]
    with pytest.raises(ValueError, match="rotated"):
        ImageGrid.from_nifti_affine((4, 4, 1), rot)


# ------------------------------------------------------------------- MR image
def _mr(grid, seed=0):
    return torch.rand(grid.shape, generator=torch.Generator().manual_seed(seed))


def test_mr_is_validated_with_helpful_messages(small_setup):
    grid, geom = small_setup
    a = _acq(small_setup, mr=np.asarray(_mr(grid)))  # numpy is accepted like the other fields
    assert a.mr.dtype == torch.float32 and tuple(a.mr.shape) == grid.shape
    assert "MR image: attached" in a.describe() and "MR image: none" in _acq(small_setup).describe()
    with pytest.raises(ValueError, match=r"shape \(1, 16, 16\).*\(1, 32, 32\).*resample the MR to the PET"):
        _acq(small_setup, mr=torch.ones(1, 16, 16))
    with pytest.raises(ValueError, match="resample"):
        a.with_mr(torch.ones(32, 32))  # a 2-D slice needs its z axis of size 1
    bad = _mr(grid)
    bad[0, 3, 4] = float("nan")
    bad[0, 5, 6] = float("inf")
    with pytest.raises(ValueError, match="MR image contains 2 NaN or infinite"):
        _acq(small_setup, mr=bad)
    with pytest.raises(ValueError, match="NaN"):
        a.with_mr(bad)


def test_with_mr_shares_the_rest_and_frame_keeps_mr(small_setup):
    grid, geom = small_setup
    a = _acq(small_setup, metadata={"name": "a"})
    mr = _mr(grid)
    b = a.with_mr(mr)
    assert a.mr is None and torch.equal(b.mr, mr)
    assert b.prompts is a.prompts and b.geometry is a.geometry and b.grid == a.grid
    b.metadata["name"] = "b"
    assert a.metadata["name"] == "a"
    assert b.with_mr(None).mr is None and b.mr is not None
    dyn = Acquisition(torch.ones(2, *geom.sinogram_shape), geom, grid, frames=FrameTiming([0, 10], [10, 20]), mr=mr)
    f1 = dyn.frame(1)
    assert not f1.is_dynamic and torch.equal(f1.mr, mr)


def _tensor_span(path, name):
    """Byte range of one tensor inside a safetensors file (8-byte header length, JSON header, data)."""
    import json

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, stop = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + stop


def test_mr_round_trip_and_checksum(tmp_path, small_acq):
    acq = small_acq.acquisition.with_mr(_mr(small_acq.acquisition.grid))
    p = save_acquisition(tmp_path / "a.petacq", acq, {"truth": small_acq.truth, "mr": acq.mr})
    b = load_acquisition(p)
    torch.testing.assert_close(b.mr, acq.mr, rtol=0, atol=0)
    assert set(load_acquisition_images(p)) == {"truth"}  # the acquisition's MR is stored once, as "mr"
    start, stop = _tensor_span(p, "mr")
    raw = bytearray(p.read_bytes())
    raw[(start + stop) // 2] ^= 0x01
    (tmp_path / "flip.petacq").write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="checksum"):
        load_acquisition(tmp_path / "flip.petacq")
    # a reference MR that differs from the attached one is kept as a reference image
    other = _mr(acq.grid, seed=5)
    p2 = save_acquisition(tmp_path / "b.petacq", acq, {"mr": other})
    torch.testing.assert_close(load_acquisition_images(p2)["mr"], other)
    torch.testing.assert_close(load_acquisition(p2).mr, acq.mr)


def test_file_without_mr_tensor_still_loads(tmp_path, small_acq):
    from safetensors import safe_open

    acq = small_acq.acquisition
    assert acq.mr is None
    # What earlier versions wrote: the MR only as a reference image, no "mr" tensor.
    p = save_acquisition(tmp_path / "old.petacq", acq, {"mr": _mr(acq.grid)})
    with safe_open(str(p), framework="pt") as f:
        assert "mr" not in set(f.keys()) and "image:mr" in set(f.keys())
    b = load_acquisition(p)
    assert b.mr is None
    torch.testing.assert_close(b.prompts, acq.prompts)
    assert "mr" in load_acquisition_images(p)
