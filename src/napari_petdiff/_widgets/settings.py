"""Settings shared by every widget (one module-level object) and the run memory guard.

The guard is an estimate, not a measurement: bytes for the image-sized working arrays
(``n_voxels x 4 B x per-method factor x samples``), the sinogram-sized ones and the stored
projector matrix, compared with the RAM the kernel reports as available. It exists so a 3-D
diffusion run that cannot fit is refused with a message instead of swapping the machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from psygnal import Signal

# Image-sized float32 arrays a run keeps alive per sample (iterate, sensitivity, gradient,
# EM ratio back-projection, ...). Diffusion samplers also hold UNet activations
# (~32-128 channels at full resolution for one slice batch), hence the larger factor.
FAMILY_FACTORS = {"classical": 10, "diffusion": 80}
DEFAULT_FACTOR = 40
SINOGRAM_FACTOR = 6      # prompts, background, factors, forward model, ratio, subsets
PROJECTOR_NNZ_PER_BIN = 1.3  # x image width: non-zeros of a Joseph row (measured 5.3 M for 180x183x128)
PROJECTOR_BYTES_PER_NNZ = 24  # CSR value + column index, for A and its transpose


class MemoryGuardError(ValueError):
    """A run would need more memory than is available."""


def available_bytes() -> int:
    """RAM available to new allocations (psutil if installed, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: the guard then does not refuse


def n_samples_of(params) -> int:
    n = getattr(params, "samples", 1)
    return max(int(n), 1) if isinstance(n, (int, float)) and not isinstance(n, bool) else 1


def estimate_run_bytes(acquisition, spec, params) -> int:
    grid = acquisition.grid
    factor = FAMILY_FACTORS.get(spec.family, DEFAULT_FACTOR)
    image = grid.n_voxels * 4 * factor * n_samples_of(params)
    sino = 0
    proj = 0
    if acquisition.prompts is not None:
        n_sino = int(acquisition.prompts.numel())
        sino = n_sino * 4 * SINOGRAM_FACTOR
        shape = tuple(acquisition.prompts.shape)
        bins_per_plane = int(shape[-1] * shape[-2])
        proj = int(bins_per_plane * max(grid.shape[1:]) * PROJECTOR_NNZ_PER_BIN * PROJECTOR_BYTES_PER_NNZ)
    return int(image + sino + proj)


def _fmt(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class _Values:
    threads: int
    device: str = "cpu"
    memory_guard: bool = True
    live_rate: float = 4.0   # live layer updates per second


class PluginSettings:
    """Shared by all widgets; ``changed`` fires after any update."""

    changed = Signal()

    def __init__(self):
        self._v = _Values(threads=torch.get_num_threads())

    @property
    def threads(self) -> int:
        return self._v.threads

    @property
    def device(self) -> str:
        return self._v.device

    @property
    def memory_guard(self) -> bool:
        return self._v.memory_guard

    @property
    def live_rate(self) -> float:
        return self._v.live_rate

    @staticmethod
    def devices() -> list[str]:
        out = ["cpu"]
        if torch.cuda.is_available():
            out.append("cuda")
        return out

    def update(self, *, threads=None, device=None, memory_guard=None, live_rate=None) -> None:
        if threads is not None:
            threads = int(threads)
            cores = os.cpu_count() or 1
            if not 1 <= threads <= max(cores, 1) * 4:
                raise ValueError(f"torch threads must be between 1 and {cores * 4}; got {threads}")
            torch.set_num_threads(threads)
            self._v.threads = threads
        if device is not None:
            if device not in self.devices():
                raise ValueError(f"device '{device}' is not available here; choose one of {self.devices()}")
            self._v.device = device
        if memory_guard is not None:
            self._v.memory_guard = bool(memory_guard)
        if live_rate is not None:
            if not 0.2 <= float(live_rate) <= 30:
                raise ValueError(f"live update rate must be 0.2-30 per second; got {live_rate}")
            self._v.live_rate = float(live_rate)
        self.changed.emit()

    def torch_device(self) -> torch.device:
        return torch.device(self._v.device)

    def check_memory(self, acquisition, spec, params, available: int | None = None) -> int:
        """Raise MemoryGuardError if the run would not fit; return the estimate in bytes."""
        need = estimate_run_bytes(acquisition, spec, params)
        if not self._v.memory_guard or acquisition.grid.is_2d:
            return need
        have = available_bytes() if available is None else int(available)
        if have and need > have:
            raise MemoryGuardError(
                f"'{spec.name}' on this {acquisition.grid.shape[0]}-slice volume needs about {_fmt(need)} "
                f"({n_samples_of(params)} sample(s)), but only {_fmt(have)} of RAM is available. "
                "Use fewer samples, a smaller image grid, or close other programs; or switch the memory guard "
                "off in the Settings widget if you know it fits.")
        return need


SETTINGS = PluginSettings()
