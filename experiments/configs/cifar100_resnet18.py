"""Spiking ResNet-18 on CIFAR-100 with rate-BP (reference hyperparameters, as CIFAR-10).

    python experiments/main.py --config experiments/configs/cifar100_resnet18.py \
        --config.data_dir=$TFDS_DATA
"""
from configs import cifar10_resnet18


def get_config():
    c = cifar10_resnet18.get_config()
    c.name = "cifar100_resnet18"
    c.dataset = "cifar100"  # 100 classes; CIFAR-100 normalisation statistics
    return c
