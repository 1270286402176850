"""MLEM / OSEM / MAP-RDP cost per iteration on the brain scanner (2-D 128x128 and 64-slice 2.5-D).

Usage: python benchmarks/classical.py [--threads N]
Writes the `classical` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

from napari_petdiff.engine.likelihood import PoissonLikelihood  # noqa: E402
from napari_petdiff.engine.rdp import RDP  # noqa: E402
from napari_petdiff.engine.samples import make_scan  # noqa: E402


def timed(fn, repeats=5):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("brain2d", "brain3d"):
        acq, _ = make_scan(name, counts=1e5 if name == "brain2d" else 5e6)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lik = PoissonLikelihood(acq, 1)
        lik8 = PoissonLikelihood(acq, 8)
        x = lik.uniform_image()
        rdp = RDP(acq.grid.voxel_size, is_2d=acq.grid.is_2d)
        t_mlem = timed(lambda: lik.em_step(x))
        t_osem = timed(lambda: [lik8.em_step(x, m) for m in lik8.subset_order])
        t_rdp = timed(lambda: rdp.gradient(x))
        t_val = timed(lambda: lik.value(x))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows.append((name, acq.grid.shape, acq.geometry.sinogram_shape, t_mlem, t_osem, t_rdp, t_val,
                     (rss - rss0) / 1024, rss / 1024))
    lines = [f"Machine: {machine()}. Command: `python benchmarks/classical.py --threads {args.threads}`.", "",
             "| scan | image (z,y,x) | sinogram (planes,views,radial) | MLEM iteration | OSEM iteration (8 subsets) "
             "| RDP gradient | log-likelihood value | memory added / peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]*1e3:.1f} ms | {r[4]*1e3:.1f} ms | {r[5]*1e3:.1f} ms | "
                     f"{r[6]*1e3:.1f} ms | {r[7]:.0f} / {r[8]:.0f} MiB |")
    lines.append("")
    lines.append("An OSEM iteration visits every view once, like an MLEM iteration; the subset matrices are row "
                 "slices of the plane matrix, which costs extra per pass in 3-D.")
