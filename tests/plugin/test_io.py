"""Reader, writer and manifest: layers land on the image grid, and the NIfTI affine survives a round trip."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_petdiff._reader import get_reader
from napari_petdiff._widgets.layers import KEY_ACQ, KEY_PATH, KEY_ROLE
from napari_petdiff._writer import write_nifti_layer
from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.io import read_nifti, save_acquisition, write_nifti

from .conftest import add_layer_data, small_scan


def test_nifti_round_trip_keeps_the_affine(tmp_path):
    from napari.components import ViewerModel

    grid = ImageGrid((3, 5, 4), (2.5, 1.5, 1.25), (-10.0, 3.0, 7.5))
    img = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    src = write_nifti(tmp_path / "in.nii.gz", img, grid)
    reader = get_reader(str(src))
    assert reader is not None
    viewer = ViewerModel()
    (layer,) = add_layer_data(viewer, reader(str(src)))
    np.testing.assert_allclose(layer.scale, grid.voxel_size)
    np.testing.assert_allclose(layer.translate, grid.origin)
    np.testing.assert_array_equal(layer.data, img)
    data, meta, _ = layer.as_layer_data_tuple()
    (out,) = write_nifti_layer(str(tmp_path / "out.nii"), data, meta)
    np.testing.assert_allclose(nib.load(out).affine, nib.load(str(src)).affine)
    arr, grid2 = read_nifti(out)
    assert grid2.matches(grid)
    np.testing.assert_array_equal(arr, img)


def test_writer_adds_suffix_and_handles_2d_layers(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    (out,) = write_nifti_layer(str(tmp_path / "slice"), data, {"scale": (2.0, 3.0), "translate": (1.0, -4.0)})
    assert out.endswith(".nii.gz")
    arr, grid = read_nifti(out)
    assert arr.shape == (1, 3, 4)
    assert grid.voxel_size[1:] == (2.0, 3.0) and grid.origin[1:] == (1.0, -4.0)


def test_writer_refuses_rotated_layers_and_sinograms(tmp_path):
    data = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="rotate"):
        write_nifti_layer(str(tmp_path / "r.nii"), data, {"scale": (1, 1, 1), "translate": (0, 0, 0),
                                                          "rotate": [[0, -1, 0], [1, 0, 0], [0, 0, 1]]})
    with pytest.raises(ValueError, match="sinogram"):
        write_nifti_layer(str(tmp_path / "p.nii"), data, {"metadata": {KEY_ROLE: "prompts"}})


def test_acquisition_reader_gives_prompts_with_acquisition_and_reference_images(tmp_path):
    acq, truth = small_scan()
    path = save_acquisition(tmp_path / "scan.petacq", acq, {"truth": truth})
    reader = get_reader(str(path))
    layers = reader(str(path))
    by_name = {kw["name"]: (data, kw, kind) for data, kw, kind in layers}
    assert set(by_name) == {"scan prompts", "scan truth"}
    data, kw, kind = by_name["scan prompts"]
    assert kind == "image" and data.shape == tuple(acq.prompts.shape)
    loaded = kw["metadata"][KEY_ACQ]
    assert loaded.grid.matches(acq.grid) and float(loaded.prompts.sum()) == float(acq.prompts.sum())
    assert Path(kw["metadata"][KEY_PATH]) == Path(path).resolve()
    data, kw, kind = by_name["scan truth"]
    np.testing.assert_allclose(data, truth.numpy())
    assert tuple(kw["scale"]) == acq.grid.voxel_size and tuple(kw["translate"]) == acq.grid.origin
    assert kw["metadata"][KEY_ROLE] == "truth"


def test_reader_declines_other_files():
    assert get_reader("image.tif") is None
    assert get_reader(["a.nii", "b.nii"]) is None


def test_manifest_validates_with_imports():
    """Same checks as `npe2 validate napari-petdiff --imports`, plus the menu ids npe2 does not check."""
    from napari._app_model.constants import MenuId
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-petdiff")
    pm.validate_imports()  # raises ValidationError naming any python_name that does not import
    widgets = {w.display_name for w in pm.contributions.widgets}
    assert {"Reconstruction", "Data", "Comparison", "Settings", "Patlak"} <= widgets
    assert {s.key for s in pm.contributions.sample_data} >= {"brain2d", "brain3d", "brain2d_dynamic"}
    contributable = {str(m) for m in MenuId.contributables()}
    submenus = {s.id for s in pm.contributions.submenus or []}
    for menu_id in pm.contributions.menus:
        assert menu_id in contributable or menu_id in submenus, f"napari would silently drop menu {menu_id}"


def test_reader_and_sample_data_show_the_acquisitions_mr(tmp_path):
    import torch

    from napari_petdiff._sample_data import scan_layers

    acq, truth = small_scan()
    mr = torch.rand(acq.grid.shape, generator=torch.Generator().manual_seed(0))
    path = save_acquisition(tmp_path / "scan.petacq", acq.with_mr(mr), {"truth": truth})
    by_name = {kw["name"]: (data, kw, kind) for data, kw, kind in get_reader(str(path))(str(path))}
    assert set(by_name) == {"scan prompts", "scan truth", "scan mr"}
    data, kw, kind = by_name["scan mr"]
    assert kind == "image" and kw["metadata"][KEY_ROLE] == "mr"
    np.testing.assert_array_equal(data, mr.numpy())
    assert tuple(kw["scale"]) == acq.grid.voxel_size and tuple(kw["translate"]) == acq.grid.origin
    torch.testing.assert_close(by_name["scan prompts"][1]["metadata"][KEY_ACQ].mr, mr)
    layers = {kw["name"]: (data, kw) for data, kw, _ in scan_layers("shepp2d", 1e4)}
    sample_acq = layers["shepp2d prompts"][1]["metadata"][KEY_ACQ]
    assert sample_acq.mr is not None
    np.testing.assert_array_equal(layers["shepp2d mr"][0], sample_acq.mr.numpy())
