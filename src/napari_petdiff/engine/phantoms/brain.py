"""Brain phantoms from the MNI152 templates: activity, attenuation with a synthetic skull, T1 MR."""
from __future__ import annotations

import numpy as np

from .deformation import deform, random_deformation_field
from .phantom import Lesion, Phantom, paint_lesions
from .templates import HEAD_CENTRE_MNI, centred_grid, crop_to, source_grid, source_volumes

# relative activity of each tissue (WM = 1); FDG grey:white 4:1 as in BrainWeb's FDG model.
# Amyloid-like: WM above GM (an amyloid-negative pattern), out of distribution for an FDG prior.
TRACERS = {
    "fdg": {"gm": 4.0, "wm": 1.0, "csf": 0.05},
    "amyloid": {"gm": 0.6, "wm": 1.0, "csf": 0.05},
}
MU_SOFT_TISSUE = 0.0096  # 1/mm at 511 keV (brain, CSF, scalp ~ water)
MU_BONE = 0.0151         # 1/mm at 511 keV (cortical skull)
# synthetic head layers, in mm of the signed distance to the smoothed brain envelope
SKULL_INNER_MM, SKULL_OUTER_MM, SCALP_OUTER_MM = 1.0, 7.5, 12.5
# T1-like intensities of the layers outside the brain (brain: the MNI T1 template, WM ~0.87, GM ~0.65)
MR_CSF, MR_SKULL, MR_SCALP = 0.12, 0.05, 0.75
DEFAULT_SHAPE = {2: (1, 128, 128), 3: (64, 128, 128)}


def _ramp(d: np.ndarray, edge: float, width: float) -> np.ndarray:
    """0 well inside ``edge``, 1 well outside: a one-voxel partial-volume transition."""
    return np.clip((d - edge) / width + 0.5, 0.0, 1.0)


def head_layers(vols: dict[str, np.ndarray], voxel_mm: float) -> dict[str, np.ndarray]:
    """Fractions of skull, scalp and extracerebral CSF from the envelope distance."""
    d = vols["brain_distance_mm"]
    inner, outer, scalp_out = (_ramp(d, e, voxel_mm) for e in (SKULL_INNER_MM, SKULL_OUTER_MM, SCALP_OUTER_MM))
    skull = inner - outer
    scalp = outer - scalp_out
    # inside the skull but outside the brain: CSF and meninges
    shell = np.clip(1.0 - inner - vols["brain"], 0.0, 1.0)
    return {"skull": skull, "scalp": scalp, "csf_shell": shell}


def tissue_maps(vols: dict[str, np.ndarray], voxel_mm: float) -> dict[str, np.ndarray]:
    """gm, wm, csf (template CSF + extracerebral CSF), brain_mask, mu and mr from resampled templates."""
    layers = head_layers(vols, voxel_mm)
    csf = np.clip(vols["csf"] + layers["csf_shell"], 0.0, 1.0)
    soft = np.clip(1.0 - layers["skull"] - _ramp(vols["brain_distance_mm"], SCALP_OUTER_MM, voxel_mm), 0.0, 1.0)
    mu = MU_SOFT_TISSUE * soft + MU_BONE * layers["skull"]
    mr = vols["t1"] + MR_CSF * layers["csf_shell"] + MR_SKULL * layers["skull"] + MR_SCALP * layers["scalp"]
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return {"gm": f32(vols["gm"]), "wm": f32(vols["wm"]), "csf": f32(csf), "brain_mask": vols["brain"] > 0.5,
            "mu": f32(mu), "mr": f32(np.clip(mr, 0.0, 1.0)), "skull": f32(layers["skull"])}


def tracer_values(tracer: str, gm_wm_ratio: float | None) -> dict[str, float]:
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {sorted(TRACERS)}; got {tracer!r}")
    vals = dict(TRACERS[tracer])
    if gm_wm_ratio is not None:
        r = float(gm_wm_ratio)
        if not (np.isfinite(r) and r > 0):
            raise ValueError(f"gm_wm_ratio must be a positive number (FDG ~4, amyloid-like ~0.6); got {gm_wm_ratio}")
        vals["gm"] = r * vals["wm"]
    return vals


def phantom_grid(dims: int, shape, voxel_size_mm, slice_z_mm: float):
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3; got {dims!r}")
    shp = DEFAULT_SHAPE[dims] if shape is None else tuple(int(s) for s in shape)
    if dims == 2 and len(shp) == 2:
        shp = (1,) + shp
    if len(shp) != 3 or (dims == 2 and shp[0] != 1) or (dims == 3 and shp[0] < 2):
        raise ValueError(f"shape {shape} does not fit dims={dims}: use (1, ny, nx) (or (ny, nx)) for 2-D and "
                         "(nz, ny, nx) with nz >= 2 for 3-D")
    if not np.isfinite(slice_z_mm):
        raise ValueError(f"slice_z_mm must be a finite world z in mm; got {slice_z_mm}")
    return centred_grid(shp, voxel_size_mm, (float(slice_z_mm), 0.0, 0.0))


def brain_phantom(dims: int = 2, shape=None, voxel_size_mm=2.0, slice_z_mm: float = 0.0, tracer: str = "fdg",
                  gm_wm_ratio: float | None = None, lesions=None, deformation_seed=None,
                  deformation_strength_mm: float = 4.0, affine_jitter: bool = True) -> Phantom:
    """A brain phantom from the MNI152 2009 templates (offline, via nilearn).

    dims=2: one axial slice, default shape (1, 128, 128), at world z ``slice_z_mm`` (0 = through
    caudate and thalamus). dims=3: default (64, 128, 128), centred at world z ``slice_z_mm``; at
    2 mm it spans 128 mm axially, from the vertex down to the upper cerebellum (the whole brain
    needs ~80 slices). 128 x 128 at 2 mm holds the whole head with its synthetic skull.

    ``gm_wm_ratio``: None = the tracer's (FDG 4, amyloid 0.6). ``lesions``: list of Lesion
    (see ``default_lesions``). ``deformation_seed``: None = the template itself, else a random
    smooth deformation of RMS ``deformation_strength_mm`` (+ a small affine if ``affine_jitter``)
    applied to every tissue map, the skull and the MR alike.
    """
    grid = phantom_grid(dims, shape, voxel_size_mm, slice_z_mm)
    values = tracer_values(tracer, gm_wm_ratio)
    lesions = [] if lesions is None else list(lesions)
    src = source_grid(grid)
    vols = source_volumes(src)
    field_params = None
    if deformation_seed is None:
        v = crop_to(vols, src, grid)
    else:
        field = random_deformation_field(grid.shape, deformation_strength_mm, grid.voxel_size, deformation_seed,
                                         affine_jitter=affine_jitter, origin=grid.origin)
        dist = "brain_distance_mm"
        v = deform({k: a for k, a in vols.items() if k != dist}, field, src)
        # beyond the source the head is air: repeat the (large) edge distance instead of 0 = brain surface
        v[dist] = deform(vols[dist], field, src, padding="border")
        field_params = field.params
    t = tissue_maps(v, min(grid.voxel_size))
    activity = values["gm"] * t["gm"] + values["wm"] * t["wm"] + values["csf"] * t["csf"]
    activity, masks = paint_lesions(activity.astype(np.float32), t["brain_mask"], lesions, grid,
                                    values["gm"], values["wm"])
    info = {
        "phantom": "mni152_brain",
        "template": "MNI152 2009a nonlinear symmetric (nilearn)",
        "head_centre_mni_zyx": list(HEAD_CENTRE_MNI),
        "tracer": tracer,
        "gm_wm_ratio": values["gm"] / values["wm"],
        "tissue_activity": values,
        "dims": dims,
        "slice_z_mm": float(slice_z_mm),
        "deformation_seed": int(deformation_seed) if isinstance(deformation_seed, (int, np.integer)) else None,
        "deformation": field_params,
        "lesions": [les.to_dict() for les in lesions],
        "grid": grid.to_dict(),
        "units": {"activity": "relative (WM = 1)", "mu": "1/mm at 511 keV", "mr": "T1-like, ~[0, 1]"},
    }
    return Phantom(activity=activity, mu=t["mu"], mr=t["mr"], gm=t["gm"], wm=t["wm"], csf=t["csf"],
                   brain_mask=t["brain_mask"], lesion_masks=masks, grid=grid, info=info)


def default_lesions(dims: int = 2) -> list[Lesion]:
    """A hot lesion (1.5 x GM, r 5 mm) in the left insular cortex and a cold one (0.5 x WM, r 7 mm)
    in the right frontal white matter, both centred on the default 2-D slice (world z = 0);
    dims=3 adds a small hot lesion (r 4 mm) in the left middle frontal gyrus at world z = +30 mm.
    Positions were picked where the undeformed template is mostly GM (hot) or WM (cold)."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3; got {dims!r}")
    out = [Lesion((0.0, 1.0, -39.0), 5.0, 1.5), Lesion((0.0, 45.0, 25.0), 7.0, 0.5)]
    if dims == 3:
        out.append(Lesion((30.0, 29.0, -27.0), 4.0, 1.5))
    return out
