"""`petdiff` command line: headless and batch use of the engine.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``; the parser
sets ``func`` to the function that runs it. This file only assembles them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module path -> sub-commands it adds; imported lazily so `petdiff --help` stays fast.
_COMMAND_MODULES = [
    "napari_petdiff._cli.data",
    "napari_petdiff._cli.recon",
    "napari_petdiff.engine.diffusion.train_cli",
    "napari_petdiff._cli.patlak",
    "napari_petdiff._cli.personal",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petdiff",
        description="PET reconstruction with diffusion-model priors (napari-petdiff engine).",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("napari_petdiff"):
                continue  # sub-command not built in this version
            raise
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "command", None) != "recon" and getattr(args, "command", None) != "patlak":
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    args._rest = rest
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        # User errors: one clear line, no traceback.
        print(f"petdiff: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
