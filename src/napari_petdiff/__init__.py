"""napari-petdiff: PET image reconstruction with diffusion-model priors."""
__version__ = "0.1.0"
