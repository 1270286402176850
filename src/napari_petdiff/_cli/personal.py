"""`petdiff personalise`: a prior personalised to one subject's MR (register, pseudo-PETs, fine-tune)."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "personalise", help="fine-tune a prior on pseudo-PETs of source subjects registered to a target MR",
        description="Register every source MR to the target MR (affine + demons), warp the source PETs, average "
                    "random Dirichlet-weighted subsets into pseudo-PETs and fine-tune a shipped prior on them. Each "
                    "stage writes NIfTI files into --out (open them in napari) and can be run on its own; running "
                    "the same command again continues where it stopped (Ctrl-C stops after a checkpoint). Use the "
                    "result with `petdiff recon ... --method dds|lisch --prior OUT/NAME.safetensors`.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mr", help="target MR (NIfTI) on the reconstruction grid")
    src.add_argument("--acq", help="acquisition (.petacq) whose attached MR is the target (grid checked)")
    p.add_argument("--check-acq", help="with --mr: an acquisition whose image grid the MR must cover")
    p.add_argument("--out", required=True, help="work folder (warped/, pseudo/, finetune/, NAME.safetensors)")
    p.add_argument("--name", default="personalised", help="name of the personalised prior")
    p.add_argument("--sources", default="phantom:8",
                   help="phantom:N (built-in differently deformed phantoms with their own lesions) or a folder of "
                        "<subject>_pet.nii.gz + <subject>_mr.nii.gz pairs (default phantom:8)")
    p.add_argument("--stage", action="append", choices=["register", "pseudo", "finetune"],
                   help="run only this stage (repeatable; default: all three)")
    p.add_argument("--registration", default="demons", choices=["demons", "bspline", "affine"])
    p.add_argument("--pseudo", type=int, default=64, help="number of pseudo-PET volumes (default 64)")
    p.add_argument("--subset", type=int, default=4, help="sources averaged per pseudo-PET (default 4)")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the weights (default 1)")
    p.add_argument("--lesion-prob", type=float, default=0.5,
                   help="fraction of pseudo-PETs given random hot/cold lesions, so the prior keeps PET-only "
                        "lesions (default 0.5; 0 = anatomy only)")
    p.add_argument("--base-prior", default="brain-fdg-2d", help="prior to fine-tune (name or .safetensors path)")
    p.add_argument("--steps", type=int, default=200,
                   help="fine-tuning steps (default 200; more = more of the MR anatomy, fewer PET-only findings)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_personalise)


def _target(args):
    from ..engine.io import load_acquisition, read_nifti

    acq_grid = None
    if args.acq:
        acq = load_acquisition(args.acq)
        if acq.mr is None:
            raise ValueError(f"{args.acq} has no MR image attached: give the target MR with --mr FILE "
                             "(and --check-acq to check it against the acquisition)")
        return acq.mr.cpu().numpy(), acq.grid, acq.grid
    mr, grid = read_nifti(args.mr)
    if mr.ndim != 3:
        raise ValueError(f"{args.mr}: the target MR must be one static 3-D (or 2-D) image; got shape {mr.shape}")
    if args.check_acq:
        acq_grid = load_acquisition(args.check_acq).grid
    return mr, grid, acq_grid


def cmd_personalise(args) -> int:
    from ..engine.personal import STAGES, PersonaliseConfig, RegistrationConfig, personalise
    from .common import ProgressBar

    mr, grid, acq_grid = _target(args)
    cfg = PersonaliseConfig(out=args.out, name=args.name, sources=args.sources,
                            registration=RegistrationConfig(method=args.registration, threads=args.threads or 2),
                            n_pseudo=args.pseudo, subset_size=args.subset, alpha=args.alpha, seed=args.seed,
                            lesion_prob=args.lesion_prob,
                            base_prior=args.base_prior, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            threads=args.threads or 2)
    stages = tuple(s for s in STAGES if s in (args.stage or STAGES))
    gen = personalise(cfg, mr, grid, stages=stages, acquisition_grid=acq_grid, device=args.device)
    bar, stage = None, None
    try:
        while True:
            ev = next(gen)
            if ev.stage != stage and not args.quiet:
                if bar is not None:
                    bar.close()
                stage = ev.stage
                print(f"{stage}:", file=sys.stderr)
                bar = ProgressBar()
            if bar is not None:
                bar(ev)
    except StopIteration as stop:
        summary = stop.value
    if bar is not None:
        bar.close()
    if summary.get("stopped"):
        print(f"stopped after {summary['steps']} fine-tuning steps (checkpoint saved): run the same command to "
              "continue", file=sys.stderr)
    if summary.get("prior"):
        print(f"personalised prior: {summary['prior']}\nuse it with: petdiff recon SCAN --method lisch --prior "
              f"{summary['prior']} --out DIR")
    else:
        print(f"stages {', '.join(stages)} done in {summary['out']}")
    return 0
