"""`petdiff simulate`, `petdiff info`, `petdiff methods`."""
from __future__ import annotations

import argparse
import json

from ..engine.params import field_type, fields_of


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a PET acquisition from a built-in phantom")
    p.add_argument("--phantom", default="brain2d", choices=["brain2d", "brain3d", "shepp2d"])
    p.add_argument("--counts", type=float, default=None,
                   help="total expected trues (default 1e5; 3e6 over the Patlak frames with --dynamic)")
    p.add_argument("--background-fraction", type=float, default=0.3,
                   help="randoms + scatter as a fraction of the trues (default 0.3)")
    p.add_argument("--psf-fwhm", type=float, default=0.0, help="resolution (Gaussian PSF FWHM) in mm")
    p.add_argument("--tracer", default="fdg", choices=["fdg", "amyloid"])
    p.add_argument("--lesions", action="store_true", help="add the default hot and cold lesions")
    p.add_argument("--seed", type=int, default=0, help="Poisson noise seed")
    p.add_argument("--dynamic", action="store_true", help="simulate a dynamic FDG scan (Patlak)")
    p.add_argument("--out", required=True, help="output .petacq file")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("info", help="describe an acquisition (.petacq) or NIfTI image")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("methods", help="list reconstruction methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)


def cmd_simulate(args) -> int:
    from ..engine.io import save_acquisition
    from ..engine.samples import make_scan

    if args.counts is None:
        args.counts = 3e6 if args.dynamic else 1e5
    if args.dynamic:
        from ..engine.kinetics.simulate import make_dynamic_scan
        acq, images = make_dynamic_scan(phantom=args.phantom, counts=args.counts,
                                        background_fraction=args.background_fraction, seed=args.seed)
    else:
        acq, images = make_scan(args.phantom, counts=args.counts, background_fraction=args.background_fraction,
                                psf_fwhm_mm=args.psf_fwhm, tracer=args.tracer, lesions=args.lesions,
                                seed=args.seed)
    path = save_acquisition(args.out, acq, images)
    print(acq.describe())
    print(f"wrote {path}")
    return 0


def cmd_info(args) -> int:
    from pathlib import Path

    from ..engine.io import ACQ_SUFFIX, load_acquisition, load_acquisition_images, read_nifti

    path = Path(args.file)
    if path.suffix == ACQ_SUFFIX:
        acq = load_acquisition(path)
        print(acq.describe())
        imgs = load_acquisition_images(path)
        if imgs:
            print("  reference images: " + ", ".join(imgs))
    else:
        arr, grid = read_nifti(path)
        print(f"NIfTI image {tuple(arr.shape)} (…, z, y, x); {grid.describe()}")
        print(f"  min {arr.min():.4g}  max {arr.max():.4g}  mean {arr.mean():.4g}")
    return 0


def cmd_methods(args) -> int:
    from ..engine.methods import list_methods

    specs = list_methods()
    if args.json:
        out = []
        for s in specs:
            out.append({"name": s.name, "kind": s.kind, "description": s.description,
                        "params": {f.name: {"default": f.default, **{k: v for k, v in f.metadata.items() if v}}
                                   for f in fields_of(s.params)}})
        print(json.dumps(out, indent=1, default=str))
        return 0
    for s in specs:
        print(f"{s.name:12s} [{s.kind}] {s.description}")
        for f in fields_of(s.params):
            m = f.metadata
            t = field_type(s.params, f)
            print(f"    --{f.name.replace('_', '-'):22s} {getattr(t, '__name__', str(t)):6s} "
                  f"default {f.default!r:10}  {m.get('help', '')}")
    return 0


_ = argparse
