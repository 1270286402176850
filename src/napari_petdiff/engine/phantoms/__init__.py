"""Offline phantoms: MNI152 brain phantoms (FDG / amyloid-like), Shepp-Logan, random training volumes.

World frame: mm, axes (z, y, x) = MNI (superior, anterior, right) with the head centre at the
origin; the default grids are centred on it. See ``templates`` for the MNI mapping and cache.
"""
from .brain import MU_BONE, MU_SOFT_TISSUE, TRACERS, brain_phantom, default_lesions
from .deformation import DeformationField, deform, random_deformation_field
from .phantom import Lesion, Phantom
from .shepp_logan import shepp_logan
from .templates import cache_dir, template_volumes
from .training import random_training_volume

__all__ = [
    "Lesion", "Phantom", "brain_phantom", "default_lesions", "template_volumes", "cache_dir",
    "DeformationField", "random_deformation_field", "deform", "random_training_volume",
    "shepp_logan", "TRACERS", "MU_SOFT_TISSUE", "MU_BONE",
]
