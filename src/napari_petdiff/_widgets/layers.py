"""Layer conventions shared by the reader, the sample data and the widgets (no Qt here).

An acquisition travels in napari as the Image layer of its prompts whose metadata holds the
:class:`Acquisition` object (``petdiff_acquisition``) and, when it came from a file, the path
(``petdiff_acquisition_path``). Reference images (truth, mu-map, MR, masks) are layers on the
image grid tagged with ``petdiff_role`` and ``petdiff_source`` (the acquisition's name), so the
widgets can find the ground truth of the data they reconstruct. An acquisition's own MR image
(``acq.mr``) is shown as its ``mr`` reference layer.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..engine.grid import ImageGrid

KEY_ACQ = "petdiff_acquisition"
KEY_PATH = "petdiff_acquisition_path"
KEY_ROLE = "petdiff_role"
KEY_SOURCE = "petdiff_source"
KEY_GRID = "petdiff_grid"

IMAGE_COLORMAPS = {"truth": "magma", "mu": "gray", "mr": "gray", "ki": "magma", "intercept": "magma",
                   "ki_analytic": "magma"}
# Shown on load; the others are there to toggle on (the top visible layer hides the rest).
VISIBLE_ROLES = {"truth", "ki"}


def to_numpy(a) -> np.ndarray:
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def grid_kwargs(grid: ImageGrid, ndim: int = 3) -> dict:
    """napari scale/translate for an array (*batch, z, y, x) on ``grid`` (batch axes unit-spaced)."""
    extra = ndim - 3
    if extra < 0:
        raise ValueError(f"an image on the grid needs (z, y, x) axes; got {ndim} dimension(s)")
    return {"scale": (1.0,) * extra + tuple(grid.napari_scale()),
            "translate": (0.0,) * extra + tuple(grid.napari_translate())}


def prompts_kwargs(acq) -> dict:
    """Place the sinogram so its plane axis follows the image z axis (direct planes = slices)."""
    shape = tuple(acq.prompts.shape)
    n_planes, n_views, n_rad = shape[-3:]
    grid = acq.grid
    if n_planes == grid.shape[0]:
        sz, tz = grid.voxel_size[0], grid.origin[0]
    else:
        sz, tz = 1.0, 0.0
    extra = len(shape) - 3
    return {"scale": (1.0,) * extra + (sz, 1.0, 1.0),
            "translate": (0.0,) * extra + (tz, -(n_views - 1) / 2.0, -(n_rad - 1) / 2.0)}


def acquisition_name(acq, fallback: str = "scan") -> str:
    return str(acq.metadata.get("name") or acq.metadata.get("phantom") or fallback)


def acquisition_layer_data(acq, images: Optional[dict] = None, name: Optional[str] = None,
                           path: Optional[str] = None) -> list[tuple]:
    """LayerDataTuples: the prompts (carrying the acquisition) and the reference images."""
    name = name or acquisition_name(acq)
    out, visible_entries = [], []
    images = dict(images or {})
    if getattr(acq, "mr", None) is not None:
        images.setdefault("mr", acq.mr)
    grid_d = acq.grid.to_dict()
    if acq.prompts is not None:
        meta = {KEY_ACQ: acq, KEY_PATH: None if path is None else str(path), KEY_ROLE: "prompts",
                KEY_SOURCE: name}
        out.append((to_numpy(acq.prompts),
                    {"name": f"{name} prompts", "metadata": meta, "colormap": "gray",
                     "visible": not any(k in VISIBLE_ROLES for k in images), **prompts_kwargs(acq)},
                    "image"))
    masks = {}
    for key in list(images):
        if key == "brain_mask" or key.startswith("lesion"):
            masks[key] = images.pop(key)
    # Visible references last: on top of the others, and the selected layer after loading.
    for key, img in sorted(images.items(), key=lambda kv: kv[0] in VISIBLE_ROLES):
        arr = to_numpy(img)
        meta = {KEY_ROLE: key, KEY_SOURCE: name, KEY_GRID: grid_d}
        entry = (arr, {"name": f"{name} {key}", "metadata": meta, "visible": key in VISIBLE_ROLES,
                       "colormap": IMAGE_COLORMAPS.get(key, "gray"), **grid_kwargs(acq.grid, arr.ndim)}, "image")
        if key in VISIBLE_ROLES:
            visible_entries.append(entry)
        else:
            out.append(entry)
    if "brain_mask" in masks:
        arr = (to_numpy(masks.pop("brain_mask")) > 0.5).astype(np.uint8)
        out.append((arr, {"name": f"{name} brain mask", "visible": False, "opacity": 0.4,
                          "metadata": {KEY_ROLE: "brain_mask", KEY_SOURCE: name, KEY_GRID: grid_d},
                          **grid_kwargs(acq.grid, arr.ndim)}, "labels"))
    if masks:
        lesions = None
        for i, key in enumerate(sorted(masks), start=1):
            m = to_numpy(masks[key]) > 0.5
            lesions = np.zeros(m.shape, np.uint8) if lesions is None else lesions
            lesions[m] = i
        out.append((lesions, {"name": f"{name} lesions", "visible": False, "opacity": 0.6,
                              "metadata": {KEY_ROLE: "lesions", KEY_SOURCE: name, KEY_GRID: grid_d},
                              **grid_kwargs(acq.grid, lesions.ndim)}, "labels"))
    out.extend(visible_entries)
    return out


def acquisition_of(layer) -> Any:
    return getattr(layer, "metadata", {}).get(KEY_ACQ)


def acquisition_layers(layers) -> list:
    return [lay for lay in layers if acquisition_of(lay) is not None]


def reference_layer(layers, source: Optional[str], role: str = "truth"):
    """The layer with ``role`` for acquisition ``source`` (None if absent)."""
    for lay in layers:
        md = getattr(lay, "metadata", {})
        if md.get(KEY_ROLE) == role and (source is None or md.get(KEY_SOURCE) == source):
            return lay
    return None


def mr_from_layer(layer, grid: ImageGrid) -> np.ndarray:
    """The data of an Image layer to attach as an acquisition's MR: on ``grid`` in shape and in world
    placement (scale = voxel size, translate = origin), else a ValueError saying what to fix."""
    data = np.asarray(layer.data)
    if data.shape != tuple(grid.shape):
        raise ValueError(
            f"MR layer '{layer.name}' has shape {data.shape} but the PET reconstruction grid is {tuple(grid.shape)} "
            "(z, y, x); resample the MR to the PET grid first, or choose another MR layer (or none).")
    scale, translate = np.asarray(layer.scale, float), np.asarray(layer.translate, float)
    if not (np.allclose(scale, grid.voxel_size, atol=1e-3) and np.allclose(translate, grid.origin, atol=1e-3)):
        raise ValueError(
            f"MR layer '{layer.name}' is placed with scale {tuple(scale)} / translate {tuple(translate)} mm but the "
            f"PET reconstruction grid has voxel size {grid.voxel_size} / origin {grid.origin} mm: it is not aligned "
            "with the PET image. Resample it to the PET grid (or fix the layer's scale and translate).")
    return np.ascontiguousarray(data, dtype=np.float32)


def _is_image(layer) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image)


def upsert_image(viewer, name: str, data: np.ndarray, grid: ImageGrid, metadata: Optional[dict] = None,
                 **kwargs):
    """Add an Image layer, or update the layer of that name in place (keeps its place and colormap)."""
    geo = grid_kwargs(grid, data.ndim)
    layer = viewer.layers[name] if name in viewer.layers else None
    if layer is not None and (not _is_image(layer) or layer.data.ndim != data.ndim):
        viewer.layers.remove(layer)
        layer = None
    if layer is None:
        layer = viewer.add_image(data, name=name, metadata=dict(metadata or {}), **geo, **kwargs)
    else:
        layer.scale = geo["scale"]
        layer.translate = geo["translate"]
        layer.data = data
        if metadata is not None:
            layer.metadata.clear()
            layer.metadata.update(metadata)
        # kwargs (colormap, visibility) only style a new layer: keep what the user changed since.
    robust_contrast(layer)
    return layer


def robust_contrast(layer, percentile: float = 99.8) -> None:
    """Contrast from the data (napari keeps old limits on ``layer.data = ...``), clipped at a high
    percentile: a few hot noise voxels in a low-count PET image would otherwise make it look black."""
    layer.reset_contrast_limits()
    data = np.asarray(layer.data)
    if data.size == 0:
        return
    hi = float(np.percentile(data, percentile))
    # PET activity and Ki are >= 0 physically: start at 0 so the empty background is black even when
    # noise makes a few voxels negative.
    lo = 0.0 if hi > 0 else float(data.min())
    if np.isfinite(hi) and hi > lo:
        layer.contrast_limits = (lo, hi)


def result_layer_names(method: str, mean_label: str = "mean") -> dict:
    return {"mean": f"{method} {mean_label}", "std": f"{method} std", "samples": f"{method} samples",
            "live": f"{method} live"}


def publish_result(viewer, method: str, result: dict, grid: ImageGrid, metadata: dict,
                   keep_samples: bool = True, mean_label: str = "mean") -> dict:
    """Result arrays -> stable-named layers ``<method> mean/std/samples/<extra>``, in place on rerun.

    ``mean_label`` renames the main image (Patlak methods: ``<method> Ki``)."""
    names = result_layer_names(method, mean_label)
    layers = {"mean": upsert_image(viewer, names["mean"], result["mean"], grid,
                                   dict(metadata, petdiff_output="mean"), colormap="magma")}
    if result.get("std") is not None:
        layers["std"] = upsert_image(viewer, names["std"], result["std"], grid,
                                     dict(metadata, petdiff_output="std"), colormap="viridis", visible=False)
    elif names["std"] in viewer.layers:
        viewer.layers.remove(names["std"])  # a stale std from another setting would mislead
    if keep_samples and result.get("samples") is not None:
        layers["samples"] = upsert_image(viewer, names["samples"], result["samples"], grid,
                                         dict(metadata, petdiff_output="samples"), colormap="magma",
                                         visible=False)
    elif names["samples"] in viewer.layers:
        viewer.layers.remove(names["samples"])
    for key, arr in (result.get("extra") or {}).items():
        layers[key] = upsert_image(viewer, f"{method} {key}", arr, grid, dict(metadata, petdiff_output=key),
                                   colormap="magma", visible=False)
    # The mean is what the user looks at: keep it the selected layer.
    viewer.layers.selection.active = layers["mean"]
    return layers
