"""`personalise`: a prior fine-tuned on pseudo-PETs of one subject (Webber et al., TRPMS 2025).

Stages, each inspectable on disk (NIfTI, viewable in napari) and resumable:

1. ``register``: every source MR to the target MR (affine + demons); the source PET warped with
   the same field -> ``<out>/warped/<name>_pet.nii.gz`` (+ ``_mr``), ``registration.json``.
2. ``pseudo``: ``n_pseudo`` Dirichlet-weighted averages of random subsets of the normalised
   warped PETs, a fraction of them with random PET-only lesions painted in (without, the prior
   learns this brain has none and erases a lesion the MR does not show) ->
   ``<out>/pseudo/pseudo-NNNN.nii.gz``, weights and lesions in ``pseudo/weights.json``.
3. ``finetune``: the base prior fine-tuned on slices of the pseudo-PETs with the shared training
   loop (checkpoints, resume, cancel) -> ``<out>/<name>.safetensors`` + card, whose
   ``personalised`` entry pins the target grid so it is never used on another subject's grid.

Re-running with the same settings continues where it stopped; other settings on the same folder
are refused (the outputs would silently mix two configurations).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..grid import ImageGrid
from ..run import CancelToken, Progress
from .pseudo import add_random_lesions, dirichlet_weights, normalise_pet, pseudo_pet
from .registration import RegistrationConfig, register
from .subjects import load_subjects

STAGES = ("register", "pseudo", "finetune")


@dataclass
class PersonaliseConfig:
    out: str = "personalised"
    name: str = "personalised"
    sources: str = "phantom:8"         # "phantom:N" (built-in) or a folder of <name>_pet/_mr.nii.gz pairs
    source_seed: int = 0
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    n_pseudo: int = 64
    subset_size: int = 4
    alpha: float = 1.0
    lesion_prob: float = 0.5           # pseudo-PETs given random PET-only lesions (keeps the prior able to show them)
    seed: int = 0
    base_prior: str = "brain-fdg-2d"
    steps: int = 200                   # measured: 200 keeps PET-only cold lesions that 800 erases
    lr: float = 5e-5
    batch_size: int = 8
    orientation_probs: tuple = (1.0, 0.0, 0.0)  # axial slices: what 2-D and default 3-D sampling use
    threads: int = 2
    checkpoint_minutes: float = 5.0

    def validate(self) -> None:
        self.registration.validate()
        if self.n_pseudo < 1:
            raise ValueError(f"n_pseudo must be >= 1; got {self.n_pseudo}")
        if self.subset_size < 1:
            raise ValueError(f"subset_size must be >= 1; got {self.subset_size}")
        if not 0.0 <= self.lesion_prob <= 1.0:
            raise ValueError(f"lesion_prob must be a probability in [0, 1]; got {self.lesion_prob}")
        if not (np.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha (Dirichlet concentration) must be > 0; got {self.alpha}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"steps and batch size must be >= 1 and lr > 0; got {self.steps}, {self.batch_size}, "
                             f"{self.lr}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["registration"] = self.registration.to_dict()
        d["orientation_probs"] = list(self.orientation_probs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PersonaliseConfig":
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        if set(d) - known:
            raise ValueError(f"unknown personalise config keys {sorted(set(d) - known)}; known: {sorted(known)}")
        if isinstance(d.get("registration"), dict):
            reg = dict(d["registration"])
            reg["levels"] = tuple(reg.get("levels", RegistrationConfig.levels))
            d["registration"] = RegistrationConfig(**reg)
        if "orientation_probs" in d:
            d["orientation_probs"] = tuple(d["orientation_probs"])
        return cls(**d)

    def stage_settings(self, stage: str) -> dict:
        """The settings an output of ``stage`` depends on (a mismatch means the outputs are stale)."""
        d = self.to_dict()
        keys = {"register": ["sources", "source_seed", "registration"],
                "pseudo": ["sources", "source_seed", "registration", "n_pseudo", "subset_size", "alpha", "lesion_prob",
                           "seed"]}
        if stage in keys:
            return {k: d[k] for k in keys[stage]}
        # steps may grow: a finished fine-tune continues from its checkpoint up to the new number
        return {k: v for k, v in d.items() if k not in ("threads", "checkpoint_minutes", "out", "steps")}


def target_digest(mr: np.ndarray, grid: ImageGrid) -> str:
    h = hashlib.sha256(np.ascontiguousarray(mr, np.float32).tobytes())
    h.update(json.dumps(grid.to_dict()).encode())
    return h.hexdigest()


def check_target(mr, grid: ImageGrid, acquisition_grid: ImageGrid | None = None) -> np.ndarray:
    mr = np.asarray(mr, np.float32)
    if mr.shape != grid.shape:
        raise ValueError(f"target MR has shape {mr.shape} but its grid is {grid.shape}")
    if not np.all(np.isfinite(mr)):
        raise ValueError("the target MR contains NaN or infinite voxels")
    if not np.any(mr > 0):
        raise ValueError("the target MR is empty (no positive voxel): give the subject's T1 image")
    if acquisition_grid is not None and not grid.contains(acquisition_grid):
        raise ValueError(
            f"the target MR's grid ({grid.describe()}) does not match the acquisition's image grid "
            f"({acquisition_grid.describe()}): the pseudo-PETs must live where the reconstruction does. Resample "
            "the MR to the acquisition's grid (same voxel size and in-plane grid; slices covering the acquisition's)."
        )
    return mr


class _Workdir:
    def __init__(self, cfg: PersonaliseConfig, mr: np.ndarray, grid: ImageGrid):
        self.root = Path(cfg.out)
        self.cfg, self.grid = cfg, grid
        self.manifest_path = self.root / "personalise.json"
        digest = target_digest(mr, grid)
        if self.manifest_path.exists():
            try:
                self.manifest = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{self.manifest_path} is corrupt; delete the folder {self.root} and run again") from None
            if self.manifest.get("target_sha256") != digest:
                raise ValueError(f"{self.root} holds a personalisation for another target MR; pick a new --out "
                                 "folder (or delete this one)")
        else:
            self.manifest = {"target_sha256": digest, "target_grid": grid.to_dict(), "stages": {}}
        self.root.mkdir(parents=True, exist_ok=True)
        from ..io import write_nifti

        tpath = self.root / "target_mr.nii.gz"
        if not tpath.exists():
            write_nifti(tpath, mr, grid)

    def done(self, stage: str) -> bool:
        st = self.manifest["stages"].get(stage)
        if st is None:
            return False
        if st.get("settings") != self.cfg.stage_settings(stage):
            raise ValueError(
                f"{self.root} was made with other {stage} settings ({st.get('settings')}); run again with those "
                f"settings to continue, or use a new --out folder")
        return bool(st.get("complete"))

    def mark(self, stage: str, complete: bool, **info) -> None:
        self.manifest["stages"][stage] = {"settings": self.cfg.stage_settings(stage), "complete": complete, **info}
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        tmp.replace(self.manifest_path)


def _write(path: Path, img, grid: ImageGrid) -> None:
    """NIfTI written under a temporary name, then renamed: a stop never leaves a half-written image
    that a resumed run would take for a finished one."""
    from ..io import write_nifti

    tmp = path.parent.parent / ".partial" / path.name  # outside every folder that is globbed
    write_nifti(tmp, img, grid)
    tmp.replace(path)


def _register_stage(w: _Workdir, mr, grid, cancel):
    from ..phantoms.deformation import deform

    cfg = w.cfg
    subjects = load_subjects(cfg.sources, grid, cfg.source_seed)
    if cfg.subset_size > len(subjects):
        raise ValueError(f"subset_size {cfg.subset_size} is larger than the source set ({len(subjects)} subjects)")
    wdir = w.root / "warped"
    wdir.mkdir(exist_ok=True)
    prev = w.manifest["stages"].get("register", {})
    results = dict(prev.get("subjects", {})) if prev.get("settings") == cfg.stage_settings("register") else {}
    for i, s in enumerate(subjects):
        yield Progress(i, len(subjects), message=f"registering {s.name}", stage="register")
        if s.name in results and (wdir / f"{s.name}_pet.nii.gz").exists():
            continue
        if cancel is not None:
            cancel.raise_if_cancelled()
        f, info = register(mr, s.mr, grid, s.grid, cfg.registration, cancel)
        pet_w, mr_w = deform([s.pet, s.mr], f, s.grid)
        _write(wdir / f"{s.name}_mr.nii.gz", mr_w, grid)
        _write(wdir / f"{s.name}_pet.nii.gz", np.clip(pet_w, 0, None), grid)  # last: marks the subject done
        results[s.name] = {**info, **{k: v for k, v in s.info.items() if k != "lesions"},
                           "lesions": len(s.info.get("lesions", []))}
        w.mark("register", False, subjects=results)
    w.mark("register", True, subjects=results)
    yield Progress(len(subjects), len(subjects), message="registration done", stage="register")


def warped_stack(root: Path) -> tuple[list[str], np.ndarray]:
    from ..io import read_nifti

    files = sorted((root / "warped").glob("*_pet.nii.gz"))
    if not files:
        raise ValueError(f"no warped source PETs in {root / 'warped'}: run the register stage first")
    names = [f.name[: -len("_pet.nii.gz")] for f in files]
    return names, np.stack([normalise_pet(read_nifti(f)[0]) for f in files])


def _pseudo_stage(w: _Workdir, grid, cancel):
    cfg = w.cfg
    if not w.done("register"):
        raise ValueError("the pseudo stage needs the registered sources: run the register stage first")
    names, stack = warped_stack(w.root)
    pdir = w.root / "pseudo"
    pdir.mkdir(exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 11]))
    weights = [dirichlet_weights(rng, len(names), min(cfg.subset_size, len(names)), cfg.alpha)
               for _ in range(cfg.n_pseudo)]  # drawn up front: a resumed run writes the same images
    lesions = []
    for q, wq in enumerate(weights):
        if q % 8 == 0:
            yield Progress(q, cfg.n_pseudo, message="pseudo-PETs", stage="pseudo")
            if cancel is not None:
                cancel.raise_if_cancelled()
        img = pseudo_pet(stack, wq)
        # one generator per image: the same image whether or not earlier ones were written before a stop
        lrng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 13, q]))
        les = []
        if lrng.random() < cfg.lesion_prob:
            img, les = add_random_lesions(img, grid, lrng)
        lesions.append(les)
        path = pdir / f"pseudo-{q:04d}.nii.gz"
        if not path.exists():
            _write(path, img, grid)
    (pdir / "weights.json").write_text(json.dumps({"sources": names, "weights": [list(map(float, v)) for v in weights],
                                                   "lesions": lesions}))
    w.mark("pseudo", True, count=cfg.n_pseudo, sources=names)
    yield Progress(cfg.n_pseudo, cfg.n_pseudo, message="pseudo-PETs done", stage="pseudo")


def finetune_config(cfg: PersonaliseConfig, root: Path, grid: ImageGrid, target_sha: str, sources: list[str]):
    from ..diffusion.io import load_prior
    from ..diffusion.train import TrainConfig, find_checkpoint

    base = load_prior(cfg.base_prior)
    arch = base.net.config
    tc = TrainConfig(
        out=str(root / "finetune"), name=cfg.name, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=min(50, cfg.steps // 4), ema_start=min(50, cfg.steps // 4), seed=cfg.seed, threads=cfg.threads,
        base_channels=arch["base_channels"], channel_mult=tuple(arch["channel_mult"]),
        num_res_blocks=arch["num_res_blocks"], attention_resolutions=tuple(arch["attention_resolutions"]),
        dropout=arch["dropout"], cond_channels=arch["cond_channels"], init_from=cfg.base_prior,
        T=base.schedule.T, beta_start=base.schedule.beta_start, beta_end=base.schedule.beta_end,
        checkpoint_minutes=cfg.checkpoint_minutes, export_to=str(root / cfg.name), export_minutes=1e9,
        description=f"{cfg.base_prior} personalised to one subject's MR ({len(sources)} registered sources)",
        card_extra={"personalised": {"base_prior": cfg.base_prior, "target_grid": grid.to_dict(),
                                     "target_mr_sha256": target_sha, "sources": sources,
                                     "n_pseudo": cfg.n_pseudo, "subset_size": cfg.subset_size, "alpha": cfg.alpha,
                                     "lesion_prob": cfg.lesion_prob,
                                     "registration": cfg.registration.to_dict()}},
    )
    tc.data.source = f"nifti:{root / 'pseudo'}"
    tc.data.image_size = base.image_size
    tc.data.voxel_size_mm = base.voxel_size_mm
    tc.data.orientation_probs = tuple(cfg.orientation_probs)
    tc.data.lesion_prob = 0.0
    if tc.cond_channels:
        raise ValueError(f"personalising needs an unconditional base prior; {cfg.base_prior!r} is MR-conditioned")
    try:
        tc.resume = str(find_checkpoint(root / "finetune"))
    except (ValueError, FileNotFoundError):
        tc.resume = ""
    return tc


def personalise(cfg: PersonaliseConfig, target_mr, target_grid: ImageGrid, stages=STAGES,
                acquisition_grid: ImageGrid | None = None, cancel: CancelToken | None = None, device="cpu"):
    """Generator of Progress events (stage = register | pseudo | finetune); returns a summary dict
    with the personalised prior's path once the finetune stage has run."""
    cfg.validate()
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}; got {list(stages)}")
    mr = check_target(target_mr, target_grid, acquisition_grid)
    w = _Workdir(cfg, mr, target_grid)
    summary = {"out": str(w.root)}
    if "register" in stages and not w.done("register"):
        yield from _register_stage(w, mr, target_grid, cancel)
    if "pseudo" in stages and not w.done("pseudo"):
        yield from _pseudo_stage(w, target_grid, cancel)
    if "finetune" in stages:
        from ..diffusion.train import train

        if not w.done("pseudo"):
            raise ValueError("the finetune stage needs the pseudo-PETs: run the pseudo stage first")
        if w.done("finetune") and w.manifest["stages"]["finetune"].get("steps", 0) >= cfg.steps:
            summary.update(prior=w.manifest["stages"]["finetune"]["prior"],
                           steps=w.manifest["stages"]["finetune"]["steps"], stopped=False)
            return summary
        tc = finetune_config(cfg, w.root, target_grid, w.manifest["target_sha256"],
                             w.manifest["stages"]["pseudo"]["sources"])
        w.mark("finetune", False)
        res = yield from train(tc, cancel=cancel, device=device)
        complete = not res["stopped"] and res["steps"] >= cfg.steps
        w.mark("finetune", complete, prior=res["export"], steps=res["steps"])
        summary.update(prior=res["export"], steps=res["steps"], stopped=res["stopped"])
    return summary
