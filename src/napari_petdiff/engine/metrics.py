"""Image-quality metrics for reconstructions against a reference (numpy or torch in, floats out).

Images are (z, y, x) (2-D: nz = 1) or any shape for the voxel-wise metrics; masks are boolean
arrays of the same shape (optional: default all voxels). SSIM is computed per axial slice.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Wang et al. 2004 constants (as skimage's gaussian_weights=True, use_sample_covariance=False)
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def _arr(a, name: str) -> np.ndarray:
    try:
        import torch
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency of the engine
        pass
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be a real numeric array; got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _pair(x, ref, names=("x", "ref")) -> tuple[np.ndarray, np.ndarray]:
    x, ref = _arr(x, names[0]), _arr(ref, names[1])
    if x.shape != ref.shape:
        raise ValueError(f"{names[0]} has shape {x.shape} but {names[1]} has shape {ref.shape}; compare images "
                         "on the same grid (resample or crop one of them first)")
    return x, ref


def _mask(mask, shape, name: str = "mask") -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = _arr(mask, name)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape} but the images have shape {tuple(shape)}; "
                         "pass a boolean mask on the image grid")
    m = m.astype(bool) if m.dtype != bool else m
    if not m.any():
        raise ValueError(f"{name} selects no voxel; pass a non-empty mask")
    return m


def _range(ref: np.ndarray, m: np.ndarray, data_range) -> float:
    if data_range is None:
        vals = ref[m]
        data_range = float(vals.max() - vals.min())
    data_range = float(data_range)
    if not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be > 0; got {data_range} (a constant reference needs an explicit "
                         "data_range=)")
    return data_range


def nrmse(x, ref, mask=None) -> float:
    """||x - ref|| / ||ref|| over the mask."""
    x, ref = _pair(x, ref)
    m = _mask(mask, ref.shape)
    norm = float(np.linalg.norm(ref[m]))
    if norm == 0:
        raise ValueError("nrmse: the reference is zero inside the mask, so the relative error is undefined")
    return float(np.linalg.norm(x[m] - ref[m]) / norm)


def psnr(x, ref, mask=None, data_range=None) -> float:
    """10 log10(range^2 / MSE) in dB over the mask; range defaults to max - min of ref in the mask."""
    x, ref = _pair(x, ref)
    m = _mask(mask, ref.shape)
    rng = _range(ref, m, data_range)
    mse = float(np.mean((x[m] - ref[m]) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(rng * rng / mse))


def ssim_map(x, ref, data_range: float) -> np.ndarray:
    """Per-voxel SSIM of (z, y, x) (or (y, x)) images, Gaussian window (sigma 1.5) within each slice."""
    x, ref = _pair(x, ref)
    if x.ndim == 2:
        return ssim_map(x[None], ref[None], data_range)[0]
    if x.ndim != 3:
        raise ValueError(f"SSIM needs (z, y, x) or (y, x) images; got shape {x.shape}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2

    def f(a):  # sigma 0 along z: slices are filtered independently
        return ndi.gaussian_filter(a, (0.0, SSIM_SIGMA, SSIM_SIGMA), truncate=SSIM_TRUNCATE, mode="reflect")

    ux, uy = f(x), f(ref)
    vx = f(x * x) - ux * ux
    vy = f(ref * ref) - uy * uy
    vxy = f(x * ref) - ux * uy
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(x, ref, mask=None, data_range=None) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian 11x11 window) over the mask, averaged over slices.

    Per axial slice: the SSIM map's mean over the mask voxels of that slice (without a mask, over
    the slice minus a 5-pixel border, as skimage does); then the mean over slices that have mask
    voxels. ``data_range`` defaults to max - min of ref in the mask (whole volume).
    """
    x, ref = _pair(x, ref)
    if x.ndim == 2:
        x, ref = x[None], ref[None]
        mask = None if mask is None else _arr(mask, "mask")[None]
    if x.ndim != 3:
        raise ValueError(f"SSIM needs (z, y, x) or (y, x) images; got shape {x.shape}")
    m = _mask(mask, ref.shape)
    smap = ssim_map(x, ref, _range(ref, m, data_range))
    if mask is None:
        pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
        if min(x.shape[1:]) <= 2 * pad:
            raise ValueError(f"SSIM needs slices larger than {2 * pad + 1} x {2 * pad + 1} pixels; got {x.shape[1:]}")
        return float(np.mean(smap[:, pad:-pad, pad:-pad].mean(axis=(1, 2))))
    per_slice = [smap[k][m[k]].mean() for k in range(x.shape[0]) if m[k].any()]
    return float(np.mean(per_slice))


def contrast_recovery(x, ref, lesion_mask, background_mask) -> float:
    """Contrast recovery coefficient ((x_l / x_b) - 1) / ((ref_l / ref_b) - 1) of mean values."""
    x, ref = _pair(x, ref)
    ml = _mask(lesion_mask, ref.shape, "lesion_mask")
    mb = _mask(background_mask, ref.shape, "background_mask")
    xb, rb = float(x[mb].mean()), float(ref[mb].mean())
    if xb == 0 or rb == 0:
        raise ValueError("contrast_recovery: the background mean is zero; choose a background with activity")
    true_contrast = float(ref[ml].mean()) / rb - 1.0
    if abs(true_contrast) < 1e-12:
        raise ValueError("contrast_recovery: lesion and background have the same mean in ref, so recovery is "
                         "undefined; check the masks")
    return float((float(x[ml].mean()) / xb - 1.0) / true_contrast)


def background_cov(x, mask) -> float:
    """Coefficient of variation std / mean (population std) of x in the background mask."""
    x = _arr(x, "x")
    m = _mask(mask, x.shape)
    mean = float(x[m].mean())
    if mean == 0:
        raise ValueError("background_cov: the mean in the mask is zero, so the CoV is undefined")
    return float(x[m].std() / mean)


def bias_variance(realisations, ref, mask=None) -> dict:
    """Ensemble bias and variance of R reconstructions of the same truth.

    ``realisations``: array/tensor (R, *ref.shape) or a list of R images, R >= 2. Returns maps
    'mean_map', 'bias_map' (mean - ref), 'variance_map' and 'std_map' (across realisations,
    ddof=1), and floats over the mask: 'bias' = ||mean - ref|| / ||ref||, 'std' =
    sqrt(sum variance) / ||ref|| (relative ensemble std), 'mean_bias', 'mean_variance', 'mean_std'
    (voxel averages, absolute units) and 'n_realisations'.
    """
    if isinstance(realisations, (list, tuple)):
        stack = np.stack([_arr(r, f"realisations[{i}]") for i, r in enumerate(realisations)])
    else:
        stack = _arr(realisations, "realisations")
    ref = _arr(ref, "ref")
    if stack.shape[1:] != ref.shape:
        raise ValueError(f"realisations have shape {stack.shape}; expected (R, {', '.join(map(str, ref.shape))}) "
                         "to match ref (stack the reconstructions along a new first axis)")
    if stack.shape[0] < 2:
        raise ValueError(f"bias_variance needs at least 2 realisations; got {stack.shape[0]}")
    m = _mask(mask, ref.shape)
    norm = float(np.linalg.norm(ref[m]))
    if norm == 0:
        raise ValueError("bias_variance: the reference is zero inside the mask, so relative bias is undefined")
    mean = stack.mean(axis=0)
    bias = mean - ref
    var = stack.var(axis=0, ddof=1)
    std = np.sqrt(var)
    return {
        "mean_map": mean, "bias_map": bias, "variance_map": var, "std_map": std,
        "bias": float(np.linalg.norm(bias[m]) / norm),
        "std": float(np.sqrt(var[m].sum()) / norm),
        "mean_bias": float(bias[m].mean()),
        "mean_variance": float(var[m].mean()),
        "mean_std": float(std[m].mean()),
        "n_realisations": int(stack.shape[0]),
    }
