"""CIFAR-10/100 and ImageNet through tensorflow-datasets, read with ``tfds.data_source``.

``tfds.data_source`` reads prepared ``array_record`` files by index without TensorFlow, so
training needs only ``tensorflow-datasets`` and ``array-record``. Preparing a dataset once
needs TensorFlow::

    pip install tensorflow-cpu
    tfds build cifar10 --file_format=array_record --data_dir=$DATA      # or cifar100
    tfds build imagenet2012 --file_format=array_record --data_dir=$DATA \
        --manual_dir=$DOWNLOADS   # ILSVRC2012_img_{train,val}.tar, downloaded by hand

then train with ``--config.data_dir=$DATA``. Reference augmentations: CIFAR gets random
crop 32 with padding 4, horizontal flip, AutoAugment (CIFAR-10 policy) and Cutout (one
16-pixel hole), then per-channel standardisation; ImageNet gets RandomResizedCrop 224 and a
flip for training, resize 256 and centre crop 224 for testing.
"""
from __future__ import annotations

import os

import numpy as np

from ratebp_jax.data import augment
from ratebp_jax.data.pipeline import ArraySource, Dataset

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 10),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 100),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def data_source(name: str, split: str, data_dir: str):
    """The prepared tfds source; a clear error when it is not there (no download here)."""
    import tensorflow_datasets as tfds

    if data_dir and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir={data_dir!r}: no such directory (it should hold "
                                f"the prepared tfds dataset {name!r})")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises several types for "not prepared"
        raise FileNotFoundError(
            f"data_dir={data_dir!r}: tfds dataset {name!r} ({split}) is not prepared there "
            f"({type(e).__name__}); prepare it once with `tfds build {name} "
            f"--file_format=array_record --data_dir=DIR` (needs tensorflow-cpu)") from None


def _to_memory(source) -> ArraySource:
    examples = [source[i] for i in range(len(source))]
    return ArraySource(np.stack([ex["image"] for ex in examples]).astype(np.uint8),
                       np.asarray([ex["label"] for ex in examples], np.int64))


def load_cifar(config) -> Dataset:
    """CIFAR-10 or CIFAR-100 (``config.dataset``), held in memory (150 MB as uint8)."""
    from ratebp_jax.data.autoaugment import auto_augment_cifar10

    mean, std, num_classes = CIFAR_STATS[config.dataset]
    train = _to_memory(data_source(config.dataset, "train", config.data_dir))
    test = _to_memory(data_source(config.dataset, "test", config.data_dir))
    standardize = augment.standardize(mean, std)
    train_tf = augment.compose(augment.random_crop(4), augment.random_flip,
                               auto_augment_cifar10, augment.cutout(16),
                               standardize) if config.augment else standardize
    return Dataset(config.dataset, train, test, num_classes, (32, 32, 3), train_tf, standardize)


class IndexedImages:
    """Random access to a tfds source of variable-size images: ``[idx] -> (list, labels)``."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, idx):
        examples = [self.source[int(i)] for i in idx]
        return [ex["image"] for ex in examples], np.asarray([ex["label"] for ex in examples])


def random_resized_crop(size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop on a list of HWC uint8 images -> ``[B, size, size, C]``."""
    from PIL import Image

    def crop_one(img, rng):
        h, w = img.shape[:2]
        area = h * w
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
            cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                break
        else:  # fall back to a centre crop of the whole image
            ch, cw, top, left = h, w, 0, 0
        patch = Image.fromarray(img[top:top + ch, left:left + cw])
        return np.asarray(patch.resize((size, size), Image.BILINEAR))

    def apply(images, rng):
        return np.stack([crop_one(img, rng) for img in images])
    return apply


def resize_center_crop(resize: int, size: int):
    """Resize the short side to ``resize``, then centre-crop ``size`` x ``size``."""
    from PIL import Image

    def one(img):
        h, w = img.shape[:2]
        s = resize / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
        top, left = (nh - size) // 2, (nw - size) // 2
        return img[top:top + size, left:left + size]

    def apply(images, rng):
        del rng
        return np.stack([one(img) for img in images])
    return apply


def load_imagenet(config) -> Dataset:
    """ImageNet-1k (``imagenet2012``), read by index from disk; images are decoded per batch."""
    size = config.image_size or 224
    train = IndexedImages(data_source("imagenet2012", "train", config.data_dir))
    test = IndexedImages(data_source("imagenet2012", "validation", config.data_dir))
    standardize = augment.standardize(*IMAGENET_STATS)
    train_tf = augment.compose(random_resized_crop(size), augment.random_flip, standardize)
    test_tf = augment.compose(resize_center_crop(round(size * 256 / 224), size), standardize)
    return Dataset("imagenet", train, test, 1000, (size, size, 3),
                   train_tf if config.augment else test_tf, test_tf)
