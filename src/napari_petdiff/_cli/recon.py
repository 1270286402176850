"""`petdiff recon FILE --method NAME [method options] --out DIR`."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .common import ProgressBar, add_params_options, params_from_namespace


def add_parser(sub) -> None:
    p = sub.add_parser("recon", help="reconstruct an acquisition; `petdiff recon --method NAME --help` "
                                     "lists that method's options", add_help=False)
    p.add_argument("file", nargs="?")
    p.add_argument("--method", default="osem")
    p.add_argument("--out", default=None, help="output folder (mean.nii.gz, std.nii.gz, samples.nii.gz, run.json)")
    p.add_argument("--frame", type=int, default=None, help="reconstruct one frame of a dynamic acquisition")
    p.add_argument("-h", "--help", action="store_true")
    p.set_defaults(func=cmd_recon)


def cmd_recon(args) -> int:
    from ..engine.io import load_acquisition, write_nifti
    from ..engine.methods import get_method
    from ..engine.params import make_params, params_to_dict
    from ..engine.run import CancelToken, Cancelled, drive

    spec = get_method(args.method)
    mp = argparse.ArgumentParser(prog=f"petdiff recon FILE --method {spec.name}", description=spec.description)
    add_params_options(mp, spec.params)
    if args.help:
        mp.print_help()
        return 0
    ns = mp.parse_args(args._rest)
    if not args.file or not args.out:
        raise ValueError("usage: petdiff recon FILE --method NAME --out DIR [method options]")
    if spec.kind != "static":
        raise ValueError(f"'{spec.name}' works on dynamic data; use `petdiff patlak`")
    params = make_params(spec.params, params_from_namespace(spec.params, ns))
    acq = load_acquisition(args.file)
    if acq.is_dynamic:
        if args.frame is None:
            raise ValueError("this acquisition is dynamic: choose a frame with --frame K, or use `petdiff patlak`")
        acq = acq.frame(args.frame)
    cancel = CancelToken()
    bar = ProgressBar()
    t0 = time.time()
    try:
        result = drive(spec.run(acq, params, cancel, device=torch.device(args.device)), bar)
    except (KeyboardInterrupt, Cancelled):
        print("\ncancelled: nothing written")
        return 130
    elapsed = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(out / "mean.nii.gz", result.mean, acq.grid)
    written = ["mean.nii.gz"]
    if result.std is not None:
        write_nifti(out / "std.nii.gz", result.std, acq.grid)
        written.append("std.nii.gz")
    if result.samples is not None:
        write_nifti(out / "samples.nii.gz", result.samples, acq.grid)
        written.append("samples.nii.gz")
    for name, img in result.extra.items():
        write_nifti(out / f"{name}.nii.gz", img, acq.grid)
        written.append(f"{name}.nii.gz")
    run = {"method": spec.name, "params": params_to_dict(params), "input": str(args.file),
           "seconds": round(elapsed, 3), "likelihood": [float(v) for v in result.likelihood],
           "warnings": result.warnings, "metadata": result.metadata, "grid": acq.grid.to_dict()}
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    print(f"wrote {', '.join(written)}, run.json to {out} ({elapsed:.1f} s)")
    return 0
