"""Run `petdiff` under torchrun with 2 CPU processes (the DDP tests of the prior and of DEFT)."""
import os
import subprocess
import sys


def torchrun_cli(args: list, timeout: float = 240) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)  # the child launcher sets it
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "napari_petdiff.cli", "--threads", "2", *args],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-2000:]
