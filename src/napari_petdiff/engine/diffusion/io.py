"""Prior files: ``<name>.safetensors`` (weights, never pickled) + ``<name>.json`` (model card).

The card holds everything needed to rebuild the prior (architecture, schedule, normalisation,
image and voxel size) plus provenance (training data, steps, wall time, date) and the sha256
of the weights file, verified on every load.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .prior import ScorePrior
from .schedule import DDPMSchedule
from .unet import UNet

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
CARD_VERSION = 1
_ARCH_KEYS = ("in_channels", "cond_channels", "out_channels", "base_channels", "channel_mult",
              "num_res_blocks", "attention_resolutions", "dropout", "image_size")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_tmp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _remove_stale_tmp(path: Path) -> None:
    """Temp files of an export killed half-way (they must never be shipped)."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        try:
            stale.unlink()
        except OSError:
            pass


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def state_dict_bytes(sd: dict, metadata: dict | None = None) -> bytes:
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in sd.items()}
    return st_save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})


def make_card(prior: ScorePrior, extra: dict | None = None) -> dict:
    card = dict(prior.card)
    card.update(extra or {})
    card.update({
        "card_version": CARD_VERSION,
        "name": prior.name,
        "kind": (extra or {}).get("kind") or prior.card.get("kind") or "ddpm-eps-unet-2d",  # DEFT: h-networks
        "architecture": dict(prior.net.config),
        "schedule": prior.schedule.to_dict(),
        "normalisation": prior.normalisation,
        "image_size": prior.image_size,
        "voxel_size_mm": prior.voxel_size_mm,
        "parameters": int(sum(p.numel() for p in prior.net.parameters())),
    })
    card.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return card


def save_prior(prior: ScorePrior, path, extra: dict | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` atomically; returns the weights path.

    ``path`` may end in .safetensors/.json or be a stem; ``extra`` adds card fields (training info).
    """
    wpath, cpath = _paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    data = state_dict_bytes(prior.net.state_dict(), {"name": prior.name, "format": "napari-petdiff-prior"})
    card = make_card(prior, extra)
    card["weights_file"] = wpath.name
    card["weights_sha256"] = sha256_bytes(data)
    card["weights_bytes"] = len(data)
    _remove_stale_tmp(wpath)
    _remove_stale_tmp(cpath)
    # both files written first, then two back-to-back renames: readers (and a commit) almost never
    # see a weights file whose card is from another export, and never a half-written file
    tmp_w = _write_tmp(wpath, data)
    tmp_c = _write_tmp(cpath, (json.dumps(card, indent=2, sort_keys=False) + "\n").encode())
    os.replace(tmp_w, wpath)
    os.replace(tmp_c, cpath)
    prior.card = card
    return wpath


def _read_card(cpath: Path) -> dict:
    try:
        card = json.loads(cpath.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model card {cpath} is not valid JSON ({exc}); re-export or re-install the prior") from None
    for key in ("architecture", "schedule", "weights_sha256", "image_size", "voxel_size_mm"):
        if key not in card:
            raise ValueError(f"model card {cpath} lacks the key {key!r}; it was not written by save_prior")
    return card


def list_priors(models_dir=None) -> list[dict]:
    """Cards of the priors in the models directory (shipped ones by default), sorted by name."""
    d = Path(models_dir) if models_dir is not None else MODELS_DIR
    cards = []
    for c in sorted(d.glob("*.json")):
        try:
            card = _read_card(c)
        except ValueError:
            continue
        if (c.with_suffix(".safetensors")).exists():
            card.setdefault("name", c.stem)
            card["path"] = str(c.with_suffix(".safetensors"))
            cards.append(card)
    return cards


def _resolve(name_or_path, models_dir=None) -> tuple[Path, Path]:
    s = str(name_or_path)
    d = Path(models_dir) if models_dir is not None else MODELS_DIR
    if os.sep not in s and "/" not in s and not s.endswith((".safetensors", ".json")):
        w, c = _paths(d / s)
        if w.exists() and c.exists():
            return w, c
        if not Path(s).exists() and not Path(s + ".safetensors").exists():
            known = [card["name"] for card in list_priors(d)]
            raise ValueError(f"unknown prior {s!r}. Known priors: {', '.join(known) or '(none shipped)'}; "
                             "or pass the path of a .safetensors file written by save_prior.")
    w, c = _paths(s)
    if not w.exists():
        raise FileNotFoundError(f"prior weights {w} not found (its card should be {c})")
    if not c.exists():
        raise FileNotFoundError(f"prior card {c} not found next to {w}: a prior needs both files")
    return w, c


def prior_stamp(name_or_path, models_dir=None) -> tuple:
    """(weights path, size, mtime, card mtime): changes whenever either file is rewritten."""
    w, c = _resolve(name_or_path, models_dir)
    sw, sc = w.stat(), c.stat()
    return str(w.resolve()), sw.st_size, sw.st_mtime_ns, sc.st_mtime_ns


def load_prior(name_or_path, device=None, models_dir=None, bf16: bool = False) -> ScorePrior:
    """Load a shipped prior by name or a saved one by path; verifies sha256, keys and shapes."""
    wpath, cpath = _resolve(name_or_path, models_dir)
    card = _read_card(cpath)
    data = wpath.read_bytes()
    digest = sha256_bytes(data)
    if digest != card["weights_sha256"]:
        raise ValueError(
            f"weights file {wpath} ({len(data)} bytes, sha256 {digest[:12]}...) does not match its card "
            f"({card.get('weights_bytes', '?')} bytes, sha256 {card['weights_sha256'][:12]}...): the file is "
            "truncated, corrupt or was replaced. Re-install the package or re-export the prior."
        )
    try:
        sd = st_load(data)
    except Exception as exc:  # safetensors raises several error types (header, size, dtype)
        raise ValueError(f"weights file {wpath} is not a readable safetensors file ({exc})") from None
    arch = card["architecture"]
    missing_arch = [k for k in _ARCH_KEYS if k not in arch]
    if missing_arch:
        raise ValueError(f"model card {cpath} lacks architecture keys {missing_arch}")
    net = UNet(**{k: arch[k] for k in _ARCH_KEYS})
    expected = net.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights {wpath} do not fit the architecture in its card: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}. The card and the weights come "
            "from different models; re-export the prior."
        )
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"weights {wpath}: {len(bad)} tensors have the wrong shape (e.g. {k}: {got}, "
                         f"architecture expects {want}); re-export the prior.")
    net.load_state_dict(sd, strict=True)
    prior = ScorePrior(net, DDPMSchedule.from_dict(card["schedule"]), name=card.get("name", wpath.stem),
                       image_size=card["image_size"], voxel_size_mm=card["voxel_size_mm"],
                       normalisation=card.get("normalisation"), card=card, bf16=bf16)
    if device is not None:
        prior.to(device)
    return prior
