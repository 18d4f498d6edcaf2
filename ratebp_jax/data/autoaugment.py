"""AutoAugment CIFAR-10 policy (Cubuk et al., 2019) in NumPy + PIL.

Hand-written because there is no maintained JAX/NumPy AutoAugment that does not pull in
torch or TensorFlow; torchvision's ``AutoAugment`` would make torch a dependency of the data
pipeline just for this. The numbers follow the widely used ``CIFAR10Policy`` class that the
rate-based-backpropagation reference code applies to CIFAR: 25 sub-policies, each two
``(operation, probability, magnitude bin)`` steps, 10 magnitude bins per operation and grey
``(128, 128, 128)`` fill for pixels that geometric operations move in from outside.

Usage, like the other host-side augmentations in :mod:`ratebp_jax.data.augment`::

    images = auto_augment_cifar10(images_uint8, rng)   # [B, H, W, 3] -> [B, H, W, 3]

It works per image with PIL and takes every random choice (sub-policy, whether each step
fires, the sign of signed magnitudes) from ``rng``, so a batch is reproducible from the
generator state alone.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

NUM_BINS = 10
FILL = (128, 128, 128)

# Magnitude of each operation per bin 0..9. Signed operations (geometry and the enhancers)
# store the absolute value here; a random sign is drawn each time they are applied.
RANGES: dict[str, np.ndarray] = {
    "shearX": np.linspace(0.0, 0.3, NUM_BINS),
    "shearY": np.linspace(0.0, 0.3, NUM_BINS),
    # Fraction of the image size (150 pixels of a 331-pixel image in the paper's ImageNet setup).
    "translateX": np.linspace(0.0, 150 / 331, NUM_BINS),
    "translateY": np.linspace(0.0, 150 / 331, NUM_BINS),
    "rotate": np.linspace(0.0, 30.0, NUM_BINS),  # degrees
    "color": np.linspace(0.0, 0.9, NUM_BINS),  # enhance factor 1 +/- magnitude
    "contrast": np.linspace(0.0, 0.9, NUM_BINS),
    "sharpness": np.linspace(0.0, 0.9, NUM_BINS),
    "brightness": np.linspace(0.0, 0.9, NUM_BINS),
    "posterize": np.round(np.linspace(8, 4, NUM_BINS)).astype(np.int64),  # bits kept
    "solarize": np.linspace(256.0, 0.0, NUM_BINS),  # invert pixels >= threshold
    # Parameter-free operations: the bin is ignored.
    "autocontrast": np.zeros(NUM_BINS),
    "equalize": np.zeros(NUM_BINS),
    "invert": np.zeros(NUM_BINS),
}

# The 25 sub-policies: ((op, probability, bin), (op, probability, bin)).
POLICIES: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("invert", 0.1, 7), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translateX", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shearY", 0.5, 8), ("translateY", 0.7, 9)),
    (("autocontrast", 0.5, 8), ("equalize", 0.9, 2)),
    (("shearY", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 5), ("equalize", 0.5, 1)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translateX", 0.5, 8)),
    (("equalize", 0.3, 7), ("autocontrast", 0.4, 8)),
    (("translateY", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 3)),
    (("equalize", 0.2, 0), ("autocontrast", 0.6, 0)),
    (("equalize", 0.2, 8), ("equalize", 0.8, 4)),
    (("color", 0.9, 9), ("equalize", 0.6, 6)),
    (("autocontrast", 0.8, 4), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, 3)),
    (("translateY", 0.9, 9), ("translateY", 0.7, 9)),
    (("autocontrast", 0.9, 2), ("solarize", 0.8, 3)),
    (("equalize", 0.8, 8), ("invert", 0.1, 3)),
    (("translateY", 0.7, 9), ("autocontrast", 0.9, 1)),
)


def _sign(rng: np.random.Generator) -> int:
    """-1 or +1 with equal probability: AutoAugment magnitudes are symmetric around identity."""
    return 1 if rng.random() < 0.5 else -1


def _affine(img: Image.Image, coeffs, resample=Image.Resampling.NEAREST) -> Image.Image:
    """Inverse-mapped affine warp; uncovered pixels get the grey fill, not black."""
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=FILL)


def shear_x(img, magnitude, rng):
    return _affine(img, (1, magnitude * _sign(rng), 0, 0, 1, 0), Image.Resampling.BICUBIC)


def shear_y(img, magnitude, rng):
    return _affine(img, (1, 0, 0, magnitude * _sign(rng), 1, 0), Image.Resampling.BICUBIC)


def translate_x(img, magnitude, rng):
    """Shift by ``magnitude`` times the width (a fraction, so it scales with image size)."""
    return _affine(img, (1, 0, magnitude * img.size[0] * _sign(rng), 0, 1, 0))


def translate_y(img, magnitude, rng):
    """Shift by ``magnitude`` times the height."""
    return _affine(img, (1, 0, 0, 0, 1, magnitude * img.size[1] * _sign(rng)))


def rotate(img, magnitude, rng):
    """Rotate by ``magnitude`` degrees (counter-clockwise) about the centre, grey fill.

    As in the reference, the rotation has no random sign (unlike shears and translates).
    The reference reaches the grey fill through an RGBA composite; PIL's ``fillcolor`` does
    the same directly.
    """
    del rng
    return img.rotate(magnitude, fillcolor=FILL)


def _enhancer(enhance_cls):
    """An op that applies a PIL enhancer with factor 1 +/- magnitude (1 is the identity)."""
    def op(img, magnitude, rng):
        return enhance_cls(img).enhance(1.0 + magnitude * _sign(rng))
    op.__doc__ = f"PIL ImageEnhance.{enhance_cls.__name__} with factor 1 +/- magnitude."
    return op


def posterize(img, magnitude, rng):
    """Keep the ``magnitude`` most significant bits of each channel."""
    del rng
    return ImageOps.posterize(img, int(magnitude))


def solarize(img, magnitude, rng):
    """Invert every channel value at or above the threshold ``magnitude``."""
    del rng
    return ImageOps.solarize(img, magnitude)


def autocontrast(img, magnitude, rng):
    del magnitude, rng
    return ImageOps.autocontrast(img)


def equalize(img, magnitude, rng):
    del magnitude, rng
    return ImageOps.equalize(img)


def invert(img, magnitude, rng):
    del magnitude, rng
    return ImageOps.invert(img)


# Operation name -> f(PIL image, magnitude, rng) -> PIL image.
OPS = {
    "shearX": shear_x,
    "shearY": shear_y,
    "translateX": translate_x,
    "translateY": translate_y,
    "rotate": rotate,
    "color": _enhancer(ImageEnhance.Color),
    "contrast": _enhancer(ImageEnhance.Contrast),
    "sharpness": _enhancer(ImageEnhance.Sharpness),
    "brightness": _enhancer(ImageEnhance.Brightness),
    "posterize": posterize,
    "solarize": solarize,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "invert": invert,
}


def apply_sub_policy(img: Image.Image, sub_policy, rng: np.random.Generator) -> Image.Image:
    """Apply each step of ``sub_policy`` in order, each with its own probability."""
    for name, prob, magnitude_bin in sub_policy:
        if rng.random() < prob:
            img = OPS[name](img, RANGES[name][magnitude_bin], rng)
    return img


def auto_augment_cifar10(images, rng):
    """images: uint8 [B, H, W, C] (C = 3), rng: numpy.random.Generator -> uint8 [B, H, W, C].

    Each image gets one of the 25 sub-policies, chosen uniformly and independently.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3] images, got {images.dtype} {images.shape}")
    out = np.empty_like(images)
    for i, image in enumerate(images):
        sub_policy = POLICIES[rng.integers(len(POLICIES))]
        out[i] = np.asarray(apply_sub_policy(Image.fromarray(image), sub_policy, rng))
    return out
