"""Host-side throughput of the CIFAR training pipeline, in images/s.

    python experiments/pipeline_throughput.py [--images 5000] [--batch 128]

Runs crop + flip + AutoAugment + Cutout + standardisation on random uint8 CIFAR-shaped
images through the same prefetching pipeline training uses (no dataset download needed),
so the figure can be set against a device's training throughput.
"""
from __future__ import annotations

import time

import numpy as np

import cli_errors
from ratebp_jax.data import augment, pipeline
from ratebp_jax.data.autoaugment import auto_augment_cifar10
from ratebp_jax.data.tfds_datasets import CIFAR_STATS


def main(argv=None):
    p = cli_errors.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000,
                   help="random images to push through the pipeline, >= --batch")
    p.add_argument("--batch", type=int, default=128, help="images per batch, >= 1")
    args = p.parse_args(argv)
    cli_errors.check_int("--batch", args.batch)
    if args.images < args.batch:  # one epoch must hold a whole batch
        raise cli_errors.UsageError(f"--images={args.images}: must be an integer >= --batch "
                                    f"({args.batch})")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.images)
    mean, std, _ = CIFAR_STATS["cifar10"]
    train_tf = augment.compose(augment.random_crop(4), augment.random_flip,
                               auto_augment_cifar10, augment.cutout(16),
                               augment.standardize(mean, std))
    source = pipeline.ArraySource(x, y)
    ds = pipeline.Dataset("cifar_shaped", source, source, 10, (32, 32, 3), train_tf,
                          augment.standardize(mean, std))
    start, n = time.perf_counter(), 0
    for batch in pipeline.prefetch(ds.train_batches(epoch=0, batch_size=args.batch, seed=0)):
        n += len(batch["label"])
    print(f"{n / (time.perf_counter() - start):.0f} images/s (CIFAR train augmentations, "
          f"batch {args.batch}, one host thread)")


if __name__ == "__main__":
    cli_errors.run(main)
