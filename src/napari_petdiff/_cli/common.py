"""Shared CLI helpers: a text progress bar and Params -> argparse options."""
from __future__ import annotations

import argparse
import sys
import time

from ..engine.params import field_type, fields_of
from ..engine.run import Progress, RunWarning


class ProgressBar:
    """Prints run-protocol Progress events as one updating line on stderr."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.monotonic()
        self._last = 0.0

    def __call__(self, ev) -> None:
        if isinstance(ev, RunWarning):
            self.stream.write(f"\nwarning: {ev.message}\n")
            return
        if not isinstance(ev, Progress):
            return
        now = time.monotonic()
        if ev.step < ev.total and now - self._last < 0.1:
            return
        self._last = now
        frac = ev.step / max(ev.total, 1)
        bar = "#" * int(frac * self.width)
        self.stream.write(f"\r[{bar:<{self.width}}] {ev.step}/{ev.total} {ev.message[:50]:<50} "
                          f"{now - self.t0:6.1f}s")
        if ev.step >= ev.total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_params_options(parser: argparse.ArgumentParser, params_cls) -> None:
    for f in fields_of(params_cls):
        t = field_type(params_cls, f)
        m = f.metadata
        unit = f" [{m['unit']}]" if m.get("unit") else ""
        rng = ""
        if m.get("min") is not None or m.get("max") is not None:
            rng = f" (range {m.get('min', '')}..{m.get('max', '')})"
        help_ = f"{m.get('help', '')}{unit}{rng}; default {f.default!r}"
        kwargs = {"dest": f.name, "default": f.default, "help": help_}
        if t is bool:
            kwargs["type"] = _bool
        elif t in (int, float, str):
            kwargs["type"] = t
        if m.get("choices"):
            kwargs["choices"] = list(m["choices"])
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def params_from_namespace(params_cls, ns) -> dict:
    return {f.name: getattr(ns, f.name) for f in fields_of(params_cls)}


def method_params(spec, prog: str, args, usage: str):
    """The method's own options (``args._rest``) as validated params; None after ``--help``."""
    from ..engine.params import make_params

    mp = argparse.ArgumentParser(prog=prog, description=spec.description)
    add_params_options(mp, spec.params)
    if args.help:
        mp.print_help()
        return None
    ns = mp.parse_args(args._rest)
    if not args.file or not args.out:
        raise ValueError(usage)
    return make_params(spec.params, params_from_namespace(spec.params, ns))


def run_and_write(spec, acq, params, device: str, out_dir, input_path, images: dict, inputs: dict | None = None) -> int:
    """Run a method with a progress bar and write ``images`` (name -> Result attribute or extra) +
    run.json; Ctrl-C cancels and writes nothing. Shared by `petdiff recon` and `petdiff patlak`."""
    import json
    from pathlib import Path

    import torch

    from ..engine.io import write_nifti
    from ..engine.params import params_to_dict
    from ..engine.run import CancelToken, Cancelled, drive

    cancel = CancelToken()
    t0 = time.time()
    try:
        result = drive(spec.run(acq, params, cancel, device=torch.device(device)), ProgressBar())
    except (KeyboardInterrupt, Cancelled):
        cancel.cancel()
        print("\ncancelled: nothing written")
        return 130
    elapsed = time.time() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {fname: getattr(result, attr) for fname, attr in images.items()}
    arrays.update({name: img for name, img in result.extra.items()})
    written = []
    for name, img in arrays.items():
        if img is not None:
            write_nifti(out / f"{name}.nii.gz", img, acq.grid)
            written.append(f"{name}.nii.gz")
    run = {"method": spec.name, "params": params_to_dict(params), "input": str(input_path),
           "seconds": round(elapsed, 3), "likelihood": [float(v) for v in result.likelihood],
           "warnings": result.warnings, "metadata": result.metadata, "grid": acq.grid.to_dict(),
           "mr_attached": getattr(acq, "mr", None) is not None, **(inputs or {})}
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    print(f"wrote {', '.join(written)}, run.json to {out} ({elapsed:.1f} s)")
    return 0
