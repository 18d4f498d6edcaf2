"""Spiking ResNet-19 on CIFAR-10 with rate-BP (reference hyperparameters).

    python experiments/main.py --config experiments/configs/cifar10_resnet19.py \
        --config.data_dir=$TFDS_DATA
"""
from configs import cifar10_resnet18


def get_config():
    c = cifar10_resnet18.get_config()
    c.name = "cifar10_resnet19"
    c.model = "resnet19"  # 128-256-512 widths, hidden Linear(512, 256) -> LIF head
    return c
