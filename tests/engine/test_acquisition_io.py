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
