"""3-D cost: runtime and peak memory per method on the 64x128x128 brain scan (2.5-D scanner).

Each method runs in its own subprocess so that its peak RSS is its own.
Usage: python benchmarks/recon3d.py [--steps 10] [--threads 2]
Writes the `recon3d` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from napari_petdiff.engine import reconstruct
from napari_petdiff.engine.metrics import nrmse
from napari_petdiff.engine.samples import make_scan
acq, ref = make_scan("brain3d", counts=float(sys.argv[4]), seed=0)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kw = json.loads(sys.argv[2])
reconstruct(acq, "osem", iterations=1, subsets=4)  # warm the projector cache
t0 = time.perf_counter()
res = reconstruct(acq, sys.argv[1], **kw)
dt = time.perf_counter() - t0
m = ref["brain_mask"] > 0
print(json.dumps({"seconds": dt, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_mib": rss0 / 1024, "nrmse": nrmse(res.mean, ref["truth"], m)}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--counts", type=float, default=2e7)
    args = ap.parse_args()
    s = args.steps
    runs = [
        ("OSEM 4 it x 8 subsets", "osem", dict(iterations=4, subsets=8)),
        ("MAP-RDP 10 epochs", "map-rdp", dict(beta=args.counts * 1e-6, epochs=10, subsets=8)),
        (f"PET-DDS xy + RDP-z, {s} steps", "dds", dict(steps=s, dc_iterations=2, subsets=8, rdpz=0.05)),
        (f"PET-LiSch xy, {s} steps", "lisch", dict(steps=s, target_iteration=10.0)),
        (f"PET-LiSch all 3 orientations, {s} steps", "lisch", dict(steps=s, target_iteration=10.0,
                                                                    orientation="all")),
        (f"PET-LiSch + SCD (LoRA, 4 slices per Adam step), {s} steps", "lisch-scd",
         dict(steps=s, target_iteration=10.0, adapt_every=2)),
        (f"DDIP-HQS (LoRA, 4 slices per Adam step), {s} steps", "ddip-hqs", dict(steps=s)),
        (f"PET-DEFT (h-network, axial; 3-D likelihood), {s} steps", "deft", dict(steps=s)),
    ]
    rows = []
    for label, method, kw in runs:
        out = subprocess.run([sys.executable, "-c", CHILD, method, json.dumps(kw), str(args.threads),
                              str(args.counts)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:])
            rows.append((label, None))
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(label, r, flush=True)
        rows.append((label, r))
    lines = [f"Machine: {machine()}; {args.threads} threads, load average {os.getloadavg()[0]:.1f} at start. "
             f"Command: `python benchmarks/recon3d.py --steps {s} --threads {args.threads}`. "
             f"Brain FDG volume 64x128x128 at 2 mm, {args.counts:.0e} trues, brain_scanner(n_rings=64) direct "
             "planes (2.5-D). One posterior sample per diffusion run; time per full 50-step sample is about "
             f"50/{s} times the time shown. Peak RSS includes the process baseline (torch, projector matrix).", "",
             "| run | seconds | peak RSS (MiB) | NRMSE in brain |", "|---|---|---|---|"]
    for label, r in rows:
        if r is None:
            lines.append(f"| {label} | failed | | |")
        else:
            lines.append(f"| {label} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['nrmse']:.3f} |")
    md = "\n".join(lines)
    print(md)
    write_section("recon3d", "## 3-D reconstruction cost\n\n" + md)


if __name__ == "__main__":
    main()
