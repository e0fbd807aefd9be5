"""What glibc's mmap threshold costs RADAR's training: mean time of one training step under each threshold.

Benchmarks that run every model in one process set ``MALLOC_MMAP_THRESHOLD_`` to keep anomalib's PatchCore coreset
loop from fragmenting the heap (README, *Compare them with anomalib's own models*). A low threshold maps and unmaps
every block above it on each allocation; this measures what that costs a training step of RADAR's default U-Net
(batch of 8 random 256x256 images, its own patch sampling, AdamW), each threshold in a fresh process::

    python benchmarks/malloc_threshold.py                       # default, 1 MiB, 4 MiB, 64 MiB
    python benchmarks/malloc_threshold.py --thresholds default 4194304 --steps 100
"""

import argparse
import os
import subprocess
import sys
import time

import torch
from torch.nn import functional


def step_seconds(steps: int, warmup: int) -> float:
    """Mean seconds per RADAR training step in this process."""
    from anomalib_diffusion.models import RADAR
    from anomalib_diffusion.models.radar.lightning_model import random_patches

    torch.manual_seed(0)
    model = RADAR()
    network = model.model.train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-4)
    images = torch.rand(8, 3, 256, 256) * 2 - 1

    def step() -> None:
        predicted, noise = network(random_patches(images, network.patch_size, model.patches_per_step))
        loss = functional.mse_loss(predicted, noise)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--thresholds", nargs="+", default=["default", "1048576", "4194304", "67108864"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(step_seconds(args.steps, args.warmup))
        return
    for threshold in args.thresholds:
        if threshold != "default" and not threshold.isdigit():
            raise SystemExit(f"--thresholds {threshold}: give bytes (e.g. 4194304) or 'default'.")
    print(f"| MALLOC_MMAP_THRESHOLD_ | s per RADAR training step (mean of {args.steps}) |\n|---|---:|")
    for threshold in args.thresholds:
        env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
        if threshold != "default":
            env["MALLOC_MMAP_THRESHOLD_"] = threshold
        command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        print(f"| {threshold} | {float(output.strip().splitlines()[-1]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
