"""Shipped priors (weights + cards in ``napari_petdiff/models``), loaded once per process."""
from __future__ import annotations

import threading

from .io import MODELS_DIR, list_priors, load_prior
from .prior import ScorePrior

DEFAULT_PRIOR = "brain-fdg-2d"
_cache: dict[tuple, ScorePrior] = {}
_lock = threading.Lock()


def shipped_prior_names() -> list[str]:
    return [c["name"] for c in list_priors(MODELS_DIR)]


def get_prior(name: str = DEFAULT_PRIOR, device=None, bf16: bool = False) -> ScorePrior:
    """A shipped prior by name, cached (do not modify it in place: use ``prior.lora`` for adaptation).

    The cache key includes the weights' sha256, so a re-exported prior is picked up.
    """
    cards = {c["name"]: c for c in list_priors(MODELS_DIR)}
    if name not in cards:
        raise ValueError(f"unknown prior {name!r}. Shipped priors: {', '.join(sorted(cards)) or '(none)'}; "
                         "a prior file elsewhere loads with napari_petdiff.engine.diffusion.load_prior(path).")
    key = (name, str(device), bool(bf16), cards[name]["weights_sha256"])
    with _lock:
        if key not in _cache:
            _cache[key] = load_prior(name, device=device, bf16=bf16)
        return _cache[key]
