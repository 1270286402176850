"""Pseudo-PET images: random Dirichlet-weighted averages of the warped, normalised source PETs."""
from __future__ import annotations

import numpy as np


def dirichlet_weights(rng: np.random.Generator, n_sources: int, subset_size: int, alpha: float = 1.0) -> np.ndarray:
    """Weights (n_sources,) >= 0 summing to one, non-zero on a random subset of ``subset_size`` sources.

    alpha = 1 draws uniformly from the simplex; large alpha tends to the plain average of the
    subset (the MIC 2024 pipeline), small alpha to single subjects (more diversity, more noise).
    """
    if n_sources < 1:
        raise ValueError("the source set is empty: pseudo-PETs need at least one warped source PET")
    if not 1 <= subset_size <= n_sources:
        raise ValueError(f"subset size must be between 1 and the number of sources ({n_sources}); got {subset_size}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Dirichlet concentration alpha must be > 0; got {alpha}")
    w = np.zeros(n_sources, np.float64)
    idx = rng.choice(n_sources, size=subset_size, replace=False)
    w[idx] = rng.dirichlet(np.full(subset_size, float(alpha)))
    return w / w.sum()  # exact unit sum despite rounding


def normalise_pet(pet: np.ndarray, rel_threshold: float = 0.05) -> np.ndarray:
    """``pet`` divided by its mean over the head support (voxels above ``rel_threshold`` x max):
    subjects differ in dose and uptake, so their PETs are put on one scale before averaging."""
    pet = np.asarray(pet, np.float32)
    support = pet > rel_threshold * float(pet.max())
    if not support.any():
        raise ValueError("a warped source PET is empty (registration moved it out of the target's field of view?)")
    return pet / float(pet[support].mean())


def pseudo_pet(warped: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i PET_i over the (S, z, y, x) stack of normalised warped PETs."""
    warped = np.asarray(warped, np.float32)
    weights = np.asarray(weights, np.float64)
    if warped.ndim != 4 or warped.shape[0] != weights.shape[0]:
        raise ValueError(f"pseudo_pet needs an (S, z, y, x) stack and S weights; got {warped.shape} and "
                         f"{weights.shape}")
    return np.tensordot(weights.astype(np.float32), warped, axes=1)


def add_random_lesions(img: np.ndarray, grid, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """``img`` with 1-3 random hot or cold spheres (the generic prior's lesion model), and their records.

    Pseudo-PETs share the target's MR anatomy and average the sources' lesions away, so a prior
    fine-tuned on them alone learns that this brain has none, and erases a PET-only lesion. GM and
    WM levels are read off the image (90th and 30th percentiles of the head support).
    """
    from ..phantoms.phantom import paint_lesions
    from ..phantoms.training import random_lesions

    support = img > 0.05 * float(img.max())
    if not support.any():
        return img, []
    gm, wm = (float(np.percentile(img[support], q)) for q in (90, 30))
    lesions = random_lesions(rng, grid, support & (img > 0.8 * wm), min(grid.voxel_size))
    out, _ = paint_lesions(img, support, lesions, grid, gm, wm, require_inside=False)
    return out.astype(np.float32), [les.to_dict() for les in lesions]
