"""Batch-wise NumPy augmentations: ``f(images [B, H, W, C], rng) -> images``.

Host-side and vectorised over the batch, so they need neither TensorFlow nor a GPU and are
reproducible from the per-step generator the pipeline passes in.
"""
from __future__ import annotations

import numpy as np


def compose(*fns):
    def apply(images, rng):
        for fn in fns:
            images = fn(images, rng)
        return images
    return apply


def standardize(mean, std):
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)

    def apply(images, rng):
        del rng
        return (images.astype(np.float32) / 255.0 - mean) / std
    return apply


def random_flip(images, rng):
    """Horizontal flip of each image with probability 1/2."""
    flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = out[flip, :, ::-1]
    return out


def random_crop(padding: int):
    """Zero-pad by ``padding`` and crop back at a random offset (RandomCrop(size, padding))."""
    def apply(images, rng):
        n, h, w = images.shape[:3]
        padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        dy = rng.integers(0, 2 * padding + 1, n)
        dx = rng.integers(0, 2 * padding + 1, n)
        rows = dy[:, None] + np.arange(h)[None]
        cols = dx[:, None] + np.arange(w)[None]
        return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return apply


def cutout(length: int):
    """Zero one ``length`` x ``length`` square per image, centred anywhere (clipped at the
    border), as the reference's Cutout(n_holes=1). Use it on uint8 images before
    :func:`standardize`: the reference also cuts out to black before Normalize."""
    def apply(images, rng):
        n, h, w = images.shape[:3]
        cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
        ys, xs = np.arange(h)[None], np.arange(w)[None]
        inside_y = (ys >= (cy - length // 2)[:, None]) & (ys < (cy + length // 2)[:, None])
        inside_x = (xs >= (cx - length // 2)[:, None]) & (xs < (cx + length // 2)[:, None])
        mask = inside_y[:, :, None] & inside_x[:, None, :]
        out = images.copy()
        out[mask] = 0
        return out
    return apply
