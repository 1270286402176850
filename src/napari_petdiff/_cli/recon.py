"""`petdiff recon FILE --method NAME [method options] --out DIR`."""
from __future__ import annotations

import argparse


from .common import add_params_options, params_from_namespace, run_and_write


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
    from ..engine.io import load_acquisition
    from ..engine.methods import get_method
    from ..engine.params import make_params

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
    return run_and_write(spec, acq, params, args.device, args.out, args.file, {"mean": "mean", "std": "std", "samples": "samples"})
