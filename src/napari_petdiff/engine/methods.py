"""Method registry: name -> (run function, Params dataclass, description).

Adding a method = one module with its run generator and Params + one ``register`` call
below. The CLI and the napari widget read nothing but this registry.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class MethodSpec:
    name: str
    run: Callable
    params: type
    description: str
    kind: str = "static"        # "static" (sinogram -> image) or "dynamic" (frames -> Patlak maps)
    family: str = "classical"   # "classical" or "diffusion"
    samples: bool = False       # returns posterior samples (mean/std)


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False

# Modules that register methods when imported; a module absent from this build is skipped.
_PROVIDERS = [
    "napari_petdiff.engine.samplers.registry",
    "napari_petdiff.engine.kinetics.registry",
]


def register(spec: MethodSpec) -> None:
    _REGISTRY[spec.name] = spec


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import classical as c

    register(MethodSpec("mlem", c.run_mlem, c.MLEMParams, "Maximum-likelihood EM (Shepp-Vardi)"))
    register(MethodSpec("osem", c.run_osem, c.OSEMParams, "Ordered-subsets EM (Hudson-Larkin)"))
    register(MethodSpec("map-rdp", c.run_map_rdp, c.MAPRDPParams,
                        "MAP with the relative difference prior (BSREM)"))
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("napari_petdiff"):
                raise


def list_methods(kind: str | None = None) -> list[MethodSpec]:
    _load()
    return [s for s in _REGISTRY.values() if kind is None or s.kind == kind]


def get_method(name: str) -> MethodSpec:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; available: {', '.join(sorted(_REGISTRY))}") from None
