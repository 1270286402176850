"""`petdiff patlak FILE --method ls|wls|red-diff|hqs|direct --t-star MIN --out DIR [method options]`."""
from __future__ import annotations

from .common import method_params, run_and_write

SHORT = {"ls": "patlak-ls", "wls": "patlak-wls", "red-diff": "patlak-red-diff", "hqs": "patlak-hqs",
         "direct": "patlak-direct"}


def add_parser(sub) -> None:
    p = sub.add_parser("patlak", help="Patlak Ki / intercept maps from a dynamic acquisition; "
                                      "`petdiff patlak --method NAME --help` lists that method's options",
                       add_help=False)
    p.add_argument("file", nargs="?")
    p.add_argument("--method", default="ls", help=f"one of {', '.join(SHORT)} (default ls)")
    p.add_argument("--out", default=None, help="output folder (ki.nii.gz, intercept.nii.gz, ki_std.nii.gz, run.json)")
    p.add_argument("-h", "--help", action="store_true")
    p.set_defaults(func=cmd_patlak)


def _spec(method: str):
    from ..engine.methods import get_method

    name = SHORT.get(method, method)
    spec = get_method(name)
    if spec.kind != "dynamic":
        raise ValueError(f"'{method}' is not a Patlak method; choose one of {', '.join(SHORT)}")
    return spec


def cmd_patlak(args) -> int:
    from ..engine.io import load_acquisition

    spec = _spec(args.method)
    params = method_params(spec, f"petdiff patlak FILE --method {args.method}", args,
                           "usage: petdiff patlak FILE --method ls|wls|red-diff|hqs|direct --t-star MIN --out DIR")
    if params is None:
        return 0
    acq = load_acquisition(args.file)
    if not acq.is_dynamic:
        raise ValueError(f"{args.file} is a static acquisition; Patlak needs dynamic data "
                         "(`petdiff simulate --dynamic` makes one)")
    return run_and_write(spec, acq, params, args.device, args.out, args.file, {"ki": "mean"})
