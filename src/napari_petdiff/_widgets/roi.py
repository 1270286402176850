"""Regions of interest drawn as Shapes or Labels layers -> boolean masks on an image's voxel grid.

Both layers and images may have their own scale/translate: everything goes through world
coordinates (mm), so a region drawn on the truth applies to every reconstruction on that grid.
"""
from __future__ import annotations

import numpy as np


def _affine(layer, n: int):
    """(scale, translate) of the last ``n`` axes of a layer (axis-aligned layers only)."""
    return np.asarray(layer.scale, float)[-n:], np.asarray(layer.translate, float)[-n:]


def _labels_mask(labels, image, shape) -> np.ndarray:
    n = min(3, labels.data.ndim)
    si, ti = _affine(image, len(shape))
    sl, tl = _affine(labels, n)
    idx = np.indices(shape).reshape(len(shape), -1).T.astype(float)       # image voxel centres
    world = idx * si + ti
    lab_idx = np.rint((world[:, -n:] - tl) / sl).astype(int)
    data = np.asarray(labels.data)
    data = data.reshape(data.shape[-n:]) if data.ndim > n else data
    inside = np.all((lab_idx >= 0) & (lab_idx < np.array(data.shape)), axis=1)
    vals = np.zeros(len(idx), dtype=data.dtype)
    vals[inside] = data[tuple(lab_idx[inside].T)]
    return (vals > 0).reshape(shape)


def _shapes_mask(shapes, image, shape) -> np.ndarray:
    from napari.layers import Shapes

    if len(shapes.data) == 0:
        return np.zeros(shape, bool)
    n = shapes.ndim
    ss, ts = _affine(shapes, n)
    si, ti = _affine(image, n if n <= len(shape) else len(shape))
    data = []
    for verts in shapes.data:
        v = np.asarray(verts, float)[:, -len(si):]
        data.append((v * ss[-len(si):] + ts[-len(si):] - ti) / si)
    tmp = Shapes(data, shape_type=list(shapes.shape_type))
    if len(si) == len(shape):
        # Snap each shape to its slice (a shape drawn on slice k has z = k in image coordinates).
        masks = tmp.to_masks(mask_shape=shape)
        return np.asarray(masks).any(axis=0).reshape(shape)
    plane = np.asarray(tmp.to_masks(mask_shape=shape[-2:])).any(axis=0)
    return np.broadcast_to(plane, shape).copy()


def roi_mask(roi_layer, image_layer) -> np.ndarray:
    """Mask of shape image.data.shape[-3:] (z, y, x) that is True inside the region."""
    from napari.layers import Labels, Shapes

    shape = tuple(np.asarray(image_layer.data).shape[-3:])
    if isinstance(roi_layer, Labels):
        return _labels_mask(roi_layer, image_layer, shape)
    if isinstance(roi_layer, Shapes):
        return _shapes_mask(roi_layer, image_layer, shape)
    raise ValueError(f"a region must be a Shapes or Labels layer; '{roi_layer.name}' is a "
                     f"{type(roi_layer).__name__} layer")


def roi_stats(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean, coefficient of variation in %) of ``image`` inside ``mask``."""
    img = np.asarray(image, float).reshape(mask.shape)
    vals = img[mask]
    if vals.size == 0:
        raise ValueError("the region is empty on this image grid: draw it over the image (in the same slice)")
    from ..engine.metrics import background_cov

    mean = float(vals.mean())
    cov = float(background_cov(img, mask)) * 100.0 if mean != 0 else float("nan")
    return mean, cov
