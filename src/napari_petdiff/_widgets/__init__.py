"""Qt dock widgets of the napari plugin: they read the engine's registry, they implement no science."""
