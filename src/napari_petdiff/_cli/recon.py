"""`petdiff recon FILE --method NAME [--mr MR.nii.gz] [method options] --out DIR`."""
from __future__ import annotations

from .common import method_params, run_and_write


def add_parser(sub) -> None:
    p = sub.add_parser("recon", help="reconstruct an acquisition; `petdiff recon --method NAME --help` "
                                     "lists that method's options", add_help=False)
    p.add_argument("file", nargs="?")
    p.add_argument("--method", default="osem")
    p.add_argument("--out", default=None, help="output folder (mean.nii.gz, std.nii.gz, samples.nii.gz, run.json)")
    p.add_argument("--frame", type=int, default=None, help="reconstruct one frame of a dynamic acquisition")
    p.add_argument("--mr", default=None, metavar="MR.nii.gz",
                   help="anatomical MR already resampled to the PET reconstruction grid (NIfTI), for "
                        "MR-conditioned methods; replaces an MR stored in FILE")
    p.add_argument("-h", "--help", action="store_true")
    p.set_defaults(func=cmd_recon)


def read_mr(path, grid):
    """A NIfTI MR volume on ``grid`` as a (z, y, x) array; a ValueError in one line otherwise."""
    from ..engine.io import read_nifti

    arr, mr_grid = read_nifti(path)
    if arr.ndim != 3:
        raise ValueError(f"--mr {path}: expected one 3-D MR volume, got an image of shape {arr.shape} (…, z, y, x)")
    if not mr_grid.matches(grid):
        raise ValueError(f"--mr {path}: the MR grid ({mr_grid.describe()}) does not match the PET reconstruction "
                         f"grid ({grid.describe()}); resample the MR to the PET grid first")
    return arr


def cmd_recon(args) -> int:
    from ..engine.io import load_acquisition
    from ..engine.methods import get_method

    spec = get_method(args.method)
    if spec.kind != "static":
        raise ValueError(f"'{spec.name}' works on dynamic data; use `petdiff patlak`")
    params = method_params(spec, f"petdiff recon FILE --method {spec.name}", args,
                           "usage: petdiff recon FILE --method NAME --out DIR [method options]")
    if params is None:
        return 0
    acq = load_acquisition(args.file)
    if acq.is_dynamic:
        if args.frame is None:
            raise ValueError("this acquisition is dynamic: choose a frame with --frame K, or use `petdiff patlak`")
        acq = acq.frame(args.frame)
    if args.mr:
        acq = acq.with_mr(read_mr(args.mr, acq.grid))
    return run_and_write(spec, acq, params, args.device, args.out, args.file,
                         {"mean": "mean", "std": "std", "samples": "samples"},
                         inputs={"mr": str(args.mr) if args.mr else ("from the input file" if acq.mr is not None else None)})
