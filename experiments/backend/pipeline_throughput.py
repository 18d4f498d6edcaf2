"""Host-side throughput of the CIFAR training pipeline, in images/s, per number of workers.

    python experiments/backend/pipeline_throughput.py [--workers 0 1 2] [--images 20000] \
        [--batch 128] [--json PATH]

Runs crop + flip + AutoAugment + Cutout + standardisation on random uint8 CIFAR-shaped
images through ``train_iterator``, the grain pipeline training reads (no dataset download
needed), once for each worker count, so the figures can be set against a device's training
throughput. ``--workers 0`` builds the batches in this process's thread; N >= 1
in N worker processes. One batch more than ``--images`` is prepared first and not timed: it
waits for the workers to start (seconds: each imports grain and jax).

Results: docs/RESULTS.md, "Input pipeline throughput".
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ratebp_jax import cli
from ratebp_jax.data import augment, pipeline
from ratebp_jax.data.autoaugment import auto_augment_cifar10
from ratebp_jax.data.tfds_datasets import CIFAR_STATS


def cifar_shaped(images: int) -> pipeline.Dataset:
    """``images`` random uint8 32x32x3 images with CIFAR-10's training augmentations."""
    rng = np.random.default_rng(0)
    source = pipeline.ArraySource(rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8),
                                  rng.integers(0, 10, images))
    mean, std, _ = CIFAR_STATS["cifar10"]
    train_tf = augment.compose(augment.random_crop(4), augment.random_flip,
                               auto_augment_cifar10, augment.cutout(16),
                               augment.standardize(mean, std))
    return pipeline.Dataset("cifar_shaped", source, source, 10, (32, 32, 3), train_tf,
                            augment.standardize(mean, std))


def measure(dataset: pipeline.Dataset, batch: int, steps: int, workers: int) -> dict:
    """images/s over ``steps`` batches, timed from the end of one untimed first batch to the
    last batch (not to the end of the iterator, which stops the workers: up to a second)."""
    start = time.perf_counter()
    with pipeline.train_iterator(dataset, batch_size=batch, seed=0, total_steps=steps + 1,
                                 workers=workers) as batches:
        next(batches)
        first = time.perf_counter()
        n = sum(len(next(batches)["label"]) for _ in range(steps))
        seconds = time.perf_counter() - first
    return {"workers": workers, "images_per_s": n / seconds, "first_batch_s": first - start}


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="worker process counts to measure, each >= 0 (0: built in line in "
                        "this process)")
    p.add_argument("--images", type=int, default=20000,
                   help="random images to time per worker count, >= --batch")
    p.add_argument("--batch", type=int, default=128, help="images per batch, >= 1")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for workers in args.workers:
        cli.check_int("--workers", workers, 0)
    cli.check_int("--batch", args.batch)
    if args.images < args.batch:  # at least one timed batch
        raise cli.UsageError(f"--images={args.images}: must be an integer >= --batch "
                                    f"({args.batch})")
    cli.check_output_path("--json", args.json)
    steps = args.images // args.batch
    dataset = cifar_shaped((steps + 1) * args.batch)
    rows = []
    for workers in args.workers:
        rows.append(measure(dataset, args.batch, steps, workers))
        print(f"workers {workers}: {rows[-1]['images_per_s']:.0f} images/s (CIFAR train "
              f"augmentations, batch {args.batch}; first batch after "
              f"{rows[-1]['first_batch_s']:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {"images": steps * args.batch, "batch": args.batch,
                                  "cpus": os.cpu_count()}, "results": rows}, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
