"""GUI-free PET engine (importable without napari or Qt)."""
from .api import reconstruct  # noqa: F401
