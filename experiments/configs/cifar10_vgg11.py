"""Spiking VGG-11 on CIFAR-10 with rate-BP (reference hyperparameters).

    python experiments/main.py --config experiments/configs/cifar10_vgg11.py \
        --config.data_dir=$TFDS_DATA
"""
from configs import cifar10_resnet18


def get_config():
    c = cifar10_resnet18.get_config()
    c.name = "cifar10_vgg11"
    c.model = "vgg11"  # the reference's 8-conv VGG-11, average pooling, N(0, 0.5^2) init
    return c
